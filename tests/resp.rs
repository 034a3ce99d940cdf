//! The Redis-protocol example (`examples/resp.rs`, included here): its parser on tricky input
//! (pipelined, split at every byte, inline quoting, malformed, huge announced lengths), and the
//! server over real sockets with a plain client (commands, pipelines, backpressure, large
//! shared values, pub/sub, limits, the size of an idle client). The comparisons with a live
//! `redis-server` and the runs of `redis-cli` and `redis-benchmark` are in `resp/redis.rs`;
//! they skip with a SKIPPED line where the tools are missing.

#[path = "resp/client.rs"]
mod client;
#[path = "resp/redis.rs"]
mod redis;
#[path = "../examples/resp.rs"]
#[allow(dead_code)]
mod resp;
mod util;

use std::io::Write;

use client::{command, Client, Served};
use resp::parse::{parse, split_args, string2ll, Progress, ProtoError, Span, Step};
use resp::{Limits, Resp};

/// Parses one request from `buf` in one go: the step and the arguments.
fn parse_whole(buf: &[u8]) -> (Step, Vec<Vec<u8>>) {
    let (mut progress, mut spans, mut inline) = (Progress::default(), Vec::new(), Vec::new());
    let step = parse(buf, &mut progress, &mut spans, &mut inline);
    (step, args_of(step, buf, &spans, &inline))
}

fn args_of(step: Step, buf: &[u8], spans: &[Span], inline: &[u8]) -> Vec<Vec<u8>> {
    let src = match step {
        Step::Request { inline: true, .. } => inline,
        _ => buf,
    };
    spans.iter().map(|s| s.of(src).to_vec()).collect()
}

/// Requests of every kind, one after the other.
fn mixed_pipeline() -> Vec<u8> {
    let mut p = command(&[b"SET", b"k\r\n\0", b"v a l"]);
    p.extend_from_slice(b"PING\r\n");
    p.extend_from_slice(b"*0\r\n");
    p.extend_from_slice(&command(&[b"MGET", b"a", b"", b"k\r\n\0"]));
    p.extend_from_slice(b"ECHO \"two words\" 'it\\'s'\n");
    p.extend_from_slice(b"\r\n");
    p.extend_from_slice(&command(&[b"ECHO", &[b'x'; 300]]));
    p.extend_from_slice(b"*1\r\n$4\r\nPINGxx");
    p
}

#[test]
fn pipelined_requests_parse_in_place_one_after_the_other() {
    let p = mixed_pipeline();
    let mut at = 0;
    let mut seen = Vec::new();
    while at < p.len() {
        let (step, args) = parse_whole(&p[at..]);
        match step {
            Step::Request { len, .. } | Step::Empty { len } => at += len,
            other => panic!("{other:?} at {at}"),
        }
        seen.push(args);
    }
    assert_eq!(at, p.len());
    let want: Vec<Vec<&[u8]>> = vec![
        vec![b"SET", b"k\r\n\0", b"v a l"],
        vec![b"PING"],
        vec![],
        vec![b"MGET", b"a", b"", b"k\r\n\0"],
        vec![b"ECHO", b"two words", b"it's"],
        vec![],
        vec![b"ECHO", &[b'x'; 300]],
        // The two bytes after a bulk are skipped unchecked, as Redis does.
        vec![b"PING"],
    ];
    assert_eq!(seen, want);
}

#[test]
fn a_request_split_at_any_byte_parses_the_same_and_resumes_where_it_stopped() {
    let p = mixed_pipeline();
    let mut at = 0;
    while at < p.len() {
        let req = &p[at..];
        let (whole, want) = parse_whole(req);
        let len = match whole {
            Step::Request { len, .. } | Step::Empty { len } => len,
            other => panic!("{other:?}"),
        };
        for cut in 0..len {
            let (mut progress, mut spans, mut inline) =
                (Progress::default(), Vec::new(), Vec::new());
            let first = parse(&req[..cut], &mut progress, &mut spans, &mut inline);
            assert_eq!(first, Step::Incomplete, "cut at {cut} of {len}");
            let step = parse(&req[..len], &mut progress, &mut spans, &mut inline);
            assert_eq!(step, whole, "cut at {cut} of {len}");
            assert_eq!(args_of(step, req, &spans, &inline), want, "cut at {cut}");
        }
        at += len;
    }
}

/// An inline line and its arguments (`None`: unbalanced quotes).
type InlineCase = (&'static [u8], Option<Vec<&'static [u8]>>);

#[test]
fn inline_requests_split_as_redis_does() {
    let cases: &[InlineCase] = &[
        (b"  SET  a\tb  ", Some(vec![b"SET", b"a", b"b"])),
        (b"ECHO \"a\\x41\\n\\\"\"", Some(vec![b"ECHO", b"aA\n\""])),
        (b"ECHO 'a\\'b' c", Some(vec![b"ECHO", b"a'b", b"c"])),
        (b"ECHO a\x0bb", Some(vec![b"ECHO", b"a\x0bb"])),
        (b"ECHO a\"b c\" d", Some(vec![b"ECHO", b"ab c", b"d"])),
        (b"ECHO a\"b c\"d", None),
        (b"ECHO 'it''s'", None),
        (b"ECHO \"\"", Some(vec![b"ECHO", b""])),
        (b"ECHO \"abc", None),
        (b"ECHO \"abc\"d", None),
        (b"ECHO 'abc", None),
        (b"", Some(vec![])),
    ];
    for (line, want) in cases {
        let (mut out, mut spans) = (Vec::new(), Vec::new());
        let ok = split_args(line, &mut out, &mut spans);
        let got = ok.then(|| spans.iter().map(|s| s.of(&out)).collect::<Vec<_>>());
        assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(line));
    }
}

#[test]
fn integers_parse_as_redis_string2ll() {
    for (s, want) in [
        (&b"0"[..], Some(0)),
        (b"-1", Some(-1)),
        (b"9223372036854775807", Some(i64::MAX)),
        (b"-9223372036854775808", Some(i64::MIN)),
        (b"9223372036854775808", None),
        (b"01", None),
        (b"-0", None),
        (b"+1", None),
        (b" 1", None),
        (b"1 ", None),
        (b"", None),
        (b"-", None),
        (b"000000000000000000001", None),
    ] {
        assert_eq!(string2ll(s), want, "{:?}", String::from_utf8_lossy(s));
    }
}

#[test]
fn malformed_requests_are_protocol_errors() {
    let long = |prefix: &[u8]| [prefix, &vec![b'1'; 70_000]].concat();
    let cases: Vec<(Vec<u8>, ProtoError)> = vec![
        (b"*abc\r\n".to_vec(), ProtoError::InvalidMultibulkLength),
        (
            b"*2147483648\r\n".to_vec(),
            ProtoError::InvalidMultibulkLength,
        ),
        (b"*01\r\n".to_vec(), ProtoError::InvalidMultibulkLength),
        (b"*1\r\nx3\r\n".to_vec(), ProtoError::ExpectedDollar(b'x')),
        (b"*1\r\n\r\n".to_vec(), ProtoError::ExpectedDollar(b'\r')),
        (b"*1\r\n$-1\r\n".to_vec(), ProtoError::InvalidBulkLength),
        (
            b"*1\r\n$536870913\r\n".to_vec(),
            ProtoError::InvalidBulkLength,
        ),
        (b"*1\r\n$1x\r\n".to_vec(), ProtoError::InvalidBulkLength),
        (b"ECHO \"open\r\n".to_vec(), ProtoError::UnbalancedQuotes),
        (vec![b'A'; 70_000], ProtoError::TooBigInline),
        (long(b"*"), ProtoError::TooBigMbulkCount),
        (long(b"*1\r\n$"), ProtoError::TooBigBulkCount),
    ];
    for (input, want) in cases {
        let (step, _) = parse_whole(&input);
        assert_eq!(
            step,
            Step::Error(want),
            "{:?}",
            &input[..input.len().min(20)]
        );
    }
    assert_eq!(
        ProtoError::ExpectedDollar(b'\n').reply(),
        b"-ERR Protocol error: expected '$', got ' '\r\n"
    );
    // Up to 64 KiB a line may still be coming; a NUL hides its end (strchr) until then.
    for waiting in [
        &vec![b'A'; 65_536][..],
        b"*1\0\r\n",
        b"*1\r\n$4\r",
        b"*1\r\n$4\r\nPIN",
    ] {
        assert_eq!(parse_whole(waiting).0, Step::Incomplete);
    }
}

#[test]
fn the_server_answers_a_pipeline_in_order_and_quit_closes_after_ok() {
    let server = Served::example();
    let mut c = Client::connect(server.addr);
    c.send(b"SET k v\r\nGET k\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\nINCR n\r\nMGET k n x\r\n");
    c.send(b"DEL k x\r\nEXISTS k n n\r\nDBSIZE\r\nPING\r\nECHO \"a b\"\r\nNOPE 1\r\n");
    let want: &[u8] = b"+OK\r\n$1\r\nv\r\n:1\r\n:2\r\n*3\r\n$1\r\nv\r\n$1\r\n2\r\n$-1\r\n\
        :1\r\n:2\r\n:1\r\n+PONG\r\n$3\r\na b\r\n\
        -ERR unknown command 'NOPE', with args beginning with: '1' \r\n";
    assert_eq!(
        String::from_utf8_lossy(&c.replies(11)),
        String::from_utf8_lossy(want)
    );
    c.send(b"QUIT\r\nPING\r\n");
    assert_eq!(c.rest(), b"+OK\r\n");
    let mut bad = Client::connect(server.addr);
    bad.send(b"PING\r\n*1\r\n$-3\r\nPING\r\n");
    assert_eq!(
        bad.rest(),
        b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
    );
    assert_eq!(server.query(|h| h.stats().protocol_errors), 1);
    server.stop();
}

#[test]
fn a_pipeline_split_at_every_byte_gets_the_same_replies() {
    let server = Served::example();
    let mut pipeline = mixed_pipeline();
    pipeline.extend_from_slice(&command(&[b"GET", b"k\r\n\0"]));
    let mut whole = Client::connect(server.addr);
    whole.send(&pipeline);
    let want = whole.replies(7);
    for cut in 1..pipeline.len() {
        let mut c = Client::connect(server.addr);
        c.send(&pipeline[..cut]);
        // Let the first part be read on its own before the rest comes.
        std::thread::sleep(std::time::Duration::from_micros(300));
        c.send(&pipeline[cut..]);
        assert_eq!(c.replies(7), want, "split at {cut}");
    }
    server.wait_for("no request left buffered", |h| h.buffered() == 0);
    server.stop();
}

#[test]
fn a_huge_announced_bulk_is_not_allocated_ahead_of_its_bytes() {
    let server = Served::example();
    let mut c = Client::connect(server.addr);
    // 512 MiB announced (the most Redis allows), a few KiB sent.
    c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$536870912\r\n");
    c.send(&[b'v'; 5000]);
    server.wait_for("the bytes to be buffered", |h| h.buffered() >= 5000);
    let held = server.query(|h| h.buffered());
    assert!(held < 64 * 1024, "{held} bytes held for 5 KB received");
    // A count of two billion arguments allocates nothing ahead either.
    let mut d = Client::connect(server.addr);
    d.send(b"*2147483647\r\n$4\r\nPING\r\n");
    server.wait_for("both requests buffered", move |h| h.buffered() > held);
    assert!(server.query(|h| h.buffered()) < 64 * 1024 + 64);
    drop((c, d));
    server.wait_for("the buffers to be freed", |h| h.buffered() == 0);
    server.stop();
}

#[test]
fn a_request_over_the_limits_closes_its_connection() {
    let limits = Limits {
        max_request: 100_000,
        max_buffered: 150_000,
    };
    let server = Served::start(Resp::with_limits(limits), |_| {});
    let mut c = Client::connect(server.addr);
    c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$200000\r\n");
    let _ = c.stream.write_all(&[b'v'; 120_000]);
    assert_eq!(c.rest(), b"", "closed without a reply, as Redis does");
    // Two partial requests of 80 KB each are within the per-request cap but not together.
    let mut a = Client::connect(server.addr);
    a.send(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$90000\r\n");
    a.send(&[b'a'; 80_000]);
    server.wait_for("a's bytes", |h| h.buffered() >= 80_000);
    let mut b = Client::connect(server.addr);
    b.send(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$90000\r\n");
    let _ = b.stream.write_all(&[b'b'; 80_000]);
    assert_eq!(b.rest(), b"");
    // The first one completes.
    a.send(&[b'a'; 10_000]);
    a.send(b"\r\n");
    assert_eq!(a.replies(1), b"+OK\r\n");
    assert_eq!(server.query(|h| h.stats().oversized), 2);
    server.stop();
}

#[test]
fn a_pipeline_larger_than_the_output_waits_instead_of_overflowing() {
    // A small kernel buffer and the example's watermarks: 20 000 GETs of a 500-byte value
    // (10 MB of replies for 600 KB of requests) sent before reading a byte.
    let server = Served::start(Resp::default(), |c| c.send_buffer = Some(64 * 1024));
    let mut c = Client::from(util::connect_small_rcvbuf(server.addr));
    let value = vec![b'm'; 500];
    assert_eq!(c.call(&command(&[b"SET", b"mid", &value])), b"+OK\r\n");
    let n = 20_000;
    let pipeline = command(&[b"GET", b"mid"]).repeat(n);
    let mut writer = c.stream.try_clone().unwrap();
    let sent = std::thread::spawn(move || writer.write_all(&pipeline));
    server.wait_for("the requests to wait", |h| h.stats().blocked > 0);
    let reply = [format!("${}\r\n", value.len()).as_bytes(), &value, b"\r\n"].concat();
    util::assert_same(&c.replies(n), &reply.repeat(n));
    sent.join().unwrap().unwrap();
    assert_eq!(c.call(b"PING\r\n"), b"+PONG\r\n");
    let m = server.stop();
    assert_eq!(
        m.closed_total(),
        m.closed_by(sockman::CloseReason::Shutdown),
        "{m}"
    );
}

#[test]
fn a_large_value_goes_to_every_reader_without_a_copy_per_reader() {
    // Copied output is capped at 1 MiB here: a 16 MiB reply that was copied would overflow.
    let server = Served::start(Resp::default(), |c| {
        c.max_pending = 1 << 20;
        c.write_high_watermark = Some(256 << 10);
    });
    let value = util::pattern(16 << 20, 3);
    let mut w = Client::connect(server.addr);
    w.send(&command(&[b"SET", b"big", &value]));
    assert_eq!(w.replies(1), b"+OK\r\n");
    let want = [format!("${}\r\n", value.len()).as_bytes(), &value, b"\r\n"].concat();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = Client::connect(server.addr);
            c.send(b"GET big\r\nMGET big big\r\n");
            std::thread::spawn(move || (c.replies(1), c.replies(1)))
        })
        .collect();
    for r in readers {
        let (get, mget) = r.join().unwrap();
        util::assert_same(&get, &want);
        util::assert_same(&mget, &[&b"*2\r\n"[..], &want, &want].concat());
    }
    let m = server.stop();
    assert_eq!(m.closed_by(sockman::CloseReason::Overflow), 0, "{m}");
}

#[test]
fn publish_reaches_every_subscriber_and_counts_them() {
    let server = Served::example();
    let mut subs: Vec<Client> = (0..3).map(|_| Client::connect(server.addr)).collect();
    for (i, s) in subs.iter_mut().enumerate() {
        let ch = if i == 2 { "other" } else { "news" };
        let got = s.call(format!("SUBSCRIBE {ch}\r\n").as_bytes());
        let want = format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{ch}\r\n:1\r\n", ch.len());
        assert_eq!(got, want.as_bytes());
    }
    let mut p = Client::connect(server.addr);
    assert_eq!(p.call(b"PUBLISH news hello\r\n"), b":2\r\n");
    let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n";
    assert_eq!(subs[0].replies(1), msg);
    assert_eq!(subs[1].replies(1), msg);
    // In subscribed mode: PING is `pong ""`, GET is refused, the connection stays.
    assert_eq!(subs[2].call(b"PING\r\n"), b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_eq!(
        subs[2].call(b"GET k\r\n"),
        &b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"[..]
    );
    // A subscriber that leaves is no longer counted; one that unsubscribes is back to normal.
    drop(subs.remove(1));
    server.wait_for("the subscriber to be gone", |h| h.channels() == 2);
    assert_eq!(p.call(b"PUBLISH news again\r\n"), b":1\r\n");
    assert_eq!(
        subs[0].call(b"UNSUBSCRIBE\r\n"),
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nagain\r\n"
    );
    assert_eq!(
        subs[0].replies(1),
        b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
    );
    assert_eq!(subs[0].call(b"PING\r\n"), b"+PONG\r\n");
    // A message of 64 KiB goes out shared to many subscribers.
    let big = vec![b'z'; 64 << 10];
    for s in &mut subs {
        s.call(b"SUBSCRIBE big\r\n");
    }
    assert_eq!(p.call(&command(&[b"PUBLISH", b"big", &big])), b":2\r\n");
    let frame = [
        &b"*3\r\n$7\r\nmessage\r\n$3\r\nbig\r\n$65536\r\n"[..],
        &big,
        b"\r\n",
    ]
    .concat();
    for s in &mut subs {
        util::assert_same(&s.replies(1), &frame);
    }
    drop((subs, p));
    server.wait_for("no channel left", |h| h.channels() == 0);
    server.stop();
}

#[test]
fn an_idle_client_is_one_pointer_and_a_short_value_is_inline() {
    assert_eq!(std::mem::size_of::<resp::Client>(), 8);
    assert!(std::mem::size_of::<resp::db::Value>() <= 32);
}
