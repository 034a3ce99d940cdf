//! The example next to a live `redis-server` 7 (started here, on a free port, nothing saved):
//! generated pipelines (seeded) and subscribed-mode sequences get byte-identical replies from
//! both, so do malformed requests up to the close, and `redis-cli` prints the same for the same
//! commands; `redis-benchmark` runs against the example without an error. Each test prints a
//! SKIPPED line and returns where its tool is missing (`.ci/run` installs them).

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

use crate::client::{command, tool_or_skip, Client, RedisServer, Served};

/// xorshift64*: the generated commands depend on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const KEYS: &[&[u8]] = &[
    b"k1",
    b"k2",
    b"counter",
    b"key with spaces",
    b"\r\n",
    b"nul\0key",
    b"\xff\xfe",
    b"",
    b"n",
    b"K1",
];

const INTEGERS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"41",
    b"9223372036854775806",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"01",
    b" 1",
    b"+1",
    b"1.5",
    b"abc",
    b"-0",
    b"99999999999999999999",
];

fn value(r: &mut Rng) -> Vec<u8> {
    match r.below(10) {
        0..=3 => r.pick(INTEGERS).to_vec(),
        4 => r.bytes(5000), // long enough to be stored and sent shared
        _ => {
            let len = r.below(40);
            r.bytes(len)
        }
    }
}

fn case(r: &mut Rng, name: &str) -> Vec<u8> {
    // Any case: Redis looks commands up case-insensitively.
    name.chars()
        .map(|c| {
            if r.below(3) == 0 {
                c.to_ascii_lowercase()
            } else {
                c
            }
        })
        .collect::<String>()
        .into_bytes()
}

/// One request of a normal connection (one reply each): every supported command, with wrong
/// arities, non-integers for INCR, SET's options, unknown commands.
fn request(r: &mut Rng) -> Vec<Vec<u8>> {
    let key = |r: &mut Rng| r.pick(KEYS).to_vec();
    let keys = |r: &mut Rng, n: usize| (0..n).map(|_| key(r)).collect::<Vec<_>>();
    let name = *r.pick(&[
        "SET", "SET", "GET", "GET", "DEL", "EXISTS", "INCR", "INCR", "MGET", "MSET", "DBSIZE",
        "PING", "ECHO", "PUBLISH", "CONFIG", "NOSUCH", "WRONG",
    ]);
    let mut args = vec![case(r, name)];
    match name {
        "SET" => {
            args.extend([key(r), value(r)]);
            for _ in 0..r.below(3) {
                let opt = *r.pick(&["NX", "XX", "GET", "KEEPTTL", "nx", "get", "BAD"]);
                args.push(opt.as_bytes().to_vec());
            }
        }
        "GET" | "INCR" => args.push(key(r)),
        "DEL" | "EXISTS" | "MGET" => {
            let n = 1 + r.below(4);
            args.extend(keys(r, n));
        }
        "MSET" => {
            for _ in 0..1 + r.below(3) {
                args.extend([key(r), value(r)]);
            }
            if r.below(5) == 0 {
                args.pop(); // an odd count: the arity error
            }
        }
        "PING" if r.below(2) == 0 => args.push(value(r)),
        "ECHO" => args.push(value(r)),
        "PUBLISH" => args.extend([b"ch1".to_vec(), value(r)]),
        "CONFIG" => args.extend([
            b"GET".to_vec(),
            r.pick(&[&b"save"[..], b"APPENDONLY", b"x"]).to_vec(),
        ]),
        "NOSUCH" => {
            for _ in 0..r.below(4) {
                let len = r.below(2) * 150 + r.below(10);
                args.push(r.bytes(len));
            }
        }
        "WRONG" => {
            // A known command with a wrong number of arguments.
            let (cmd, n) = *r.pick(&[
                ("GET", 0),
                ("GET", 2),
                ("INCR", 2),
                ("ECHO", 0),
                ("DBSIZE", 1),
                ("PUBLISH", 1),
                ("SET", 1),
                ("PING", 2),
                ("DEL", 0),
            ]);
            args = vec![case(r, cmd)];
            args.extend(keys(r, n));
        }
        _ => {}
    }
    args
}

/// `args` as bytes on the wire: a RESP array, or an inline line (plain words, or every
/// argument in double quotes with `\xHH` escapes, which carries any bytes).
fn encode(r: &mut Rng, args: &[Vec<u8>]) -> Vec<u8> {
    let plain = args
        .iter()
        .all(|a| !a.is_empty() && a.iter().all(|c| c.is_ascii_alphanumeric()));
    match r.below(8) {
        0 | 1 if plain => {
            let line = args
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>();
            format!("{}\r\n", line.join(" ")).into_bytes()
        }
        2 => {
            let mut line = Vec::new();
            for a in args {
                line.extend_from_slice(b" \"");
                for &c in a {
                    if c.is_ascii_alphanumeric() {
                        line.push(c);
                    } else {
                        line.extend_from_slice(format!("\\x{c:02x}").as_bytes());
                    }
                }
                line.push(b'"');
            }
            line.extend_from_slice(b"\r\n");
            line
        }
        _ => command(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
    }
}

/// Sends `bytes` in chunks of random sizes while a thread reads `replies` replies.
fn exchange(addr: SocketAddr, r: &mut Rng, bytes: &[u8], replies: usize) -> Vec<u8> {
    let mut c = Client::connect(addr);
    let mut writer = c.stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || c.replies(replies));
    let mut at = 0;
    while at < bytes.len() {
        let n = (1 + r.below(3000)).min(bytes.len() - at);
        writer.write_all(&bytes[at..at + n]).unwrap();
        at += n;
    }
    reader.join().expect("the replies")
}

/// The first difference between two transcripts, readably.
#[track_caller]
fn assert_same_replies(ours: &[u8], redis: &[u8], what: &str) {
    if ours != redis {
        let at = ours
            .iter()
            .zip(redis)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(redis.len()));
        let from = at.saturating_sub(200);
        panic!(
            "{what}: the replies differ at byte {at}\n ours:  {:?}\n redis: {:?}",
            String::from_utf8_lossy(&ours[from..(at + 200).min(ours.len())]),
            String::from_utf8_lossy(&redis[from..(at + 200).min(redis.len())]),
        );
    }
}

#[test]
fn generated_pipelines_get_the_same_replies_as_redis_server() {
    let Some(redis) = RedisServer::start("generated_pipelines") else {
        return;
    };
    let ours = Served::example();
    for seed in 1..=3u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut bytes = Vec::new();
        let n = 2000;
        for _ in 0..n {
            let args = request(&mut r);
            bytes.extend_from_slice(&encode(&mut r, &args));
        }
        let got = exchange(ours.addr, &mut Rng(seed), &bytes, n);
        let want = exchange(redis.addr, &mut Rng(seed), &bytes, n);
        assert_same_replies(&got, &want, &format!("seed {seed}"));
    }
    ours.stop();
}

/// One request of a connection that subscribes: (re)subscribing, unsubscribing, PING, and
/// commands refused in subscribed mode. `channels` is what it is subscribed to after.
fn subscriber_request(r: &mut Rng, channels: &mut Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let pool: &[&[u8]] = &[b"ch1", b"ch2", b"bin\0\r\n"];
    let some = |r: &mut Rng| {
        let n = 1 + r.below(3);
        (0..n).map(|_| r.pick(pool).to_vec()).collect::<Vec<_>>()
    };
    match r.below(8) {
        0..=2 => {
            let chs = some(r);
            for c in &chs {
                if !channels.contains(c) {
                    channels.push(c.clone());
                }
            }
            [vec![case(r, "SUBSCRIBE")], chs].concat()
        }
        3 => {
            let chs = some(r);
            channels.retain(|c| !chs.contains(c));
            [vec![case(r, "UNSUBSCRIBE")], chs].concat()
        }
        // A bare UNSUBSCRIBE lists the channels in Redis's hash order: only with one or none.
        4 if channels.len() <= 1 => {
            channels.clear();
            vec![b"UNSUBSCRIBE".to_vec()]
        }
        5 => vec![b"PING".to_vec(), r.bytes(3)],
        _ => request(r),
    }
}

#[test]
fn subscribed_mode_sequences_get_the_same_replies_as_redis_server() {
    let Some(redis) = RedisServer::start("subscribed_mode") else {
        return;
    };
    let ours = Served::example();
    let mut transcripts = Vec::new();
    for addr in [ours.addr, redis.addr] {
        let mut r = Rng(7);
        let (mut sub, mut publisher) = (Client::connect(addr), Client::connect(addr));
        let mut channels = Vec::new();
        let mut transcript = Vec::new();
        for round in 0..60 {
            // The subscriber's batch, closed by a PING whose reply marks its end.
            let mut batch = Vec::new();
            for _ in 0..1 + r.below(6) {
                let args = subscriber_request(&mut r, &mut channels);
                batch.extend_from_slice(&encode(&mut r, &args));
            }
            let token = format!("end{round}");
            batch.extend_from_slice(&command(&[b"PING", token.as_bytes()]));
            let end = |subscribed: bool| match subscribed {
                true => format!("*2\r\n$4\r\npong\r\n${}\r\n{token}\r\n", token.len()),
                false => format!("${}\r\n{token}\r\n", token.len()),
            };
            sub.send(&batch);
            transcript.extend(sub.replies_until(end(!channels.is_empty()).as_bytes()));
            // The publisher's batch; then what reached the subscriber, up to another PING.
            let mut pubs = Vec::new();
            let n = 1 + r.below(5);
            for _ in 0..n {
                let ch = r
                    .pick(&[&b"ch1"[..], b"ch2", b"bin\0\r\n", b"none"])
                    .to_vec();
                let msg = value(&mut r);
                pubs.extend_from_slice(&command(&[b"PUBLISH", &ch, &msg]));
            }
            publisher.send(&pubs);
            transcript.extend(publisher.replies(n));
            sub.send(&command(&[b"PING", token.as_bytes()]));
            transcript.extend(sub.replies_until(end(!channels.is_empty()).as_bytes()));
        }
        transcripts.push(transcript);
    }
    assert_same_replies(&transcripts[0], &transcripts[1], "subscribed mode");
    ours.stop();
}

#[test]
fn malformed_requests_get_the_same_error_and_close_as_redis_server() {
    let Some(redis) = RedisServer::start("malformed_requests") else {
        return;
    };
    let ours = Served::example();
    let long = |prefix: &[u8]| [prefix, &vec![b'1'; 70_000]].concat();
    let cases: Vec<Vec<u8>> = vec![
        b"*abc\r\n".to_vec(),
        b"*2147483648\r\n".to_vec(),
        b"*1\r\nx3\r\n".to_vec(),
        b"*1\r\n\r\n".to_vec(),
        b"*1\r\n$-1\r\n".to_vec(),
        b"*1\r\n$536870913\r\n".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$x\r\n".to_vec(),
        b"ECHO \"open\r\n".to_vec(),
        b"ECHO \"a\"b\r\n".to_vec(),
        vec![b'A'; 70_000],
        long(b"*"),
        long(b"*1\r\n$"),
    ];
    for (i, bad) in cases.iter().enumerate() {
        // Requests before the bad one are answered first; nothing after it. (Not after a line
        // too long: whether a line of 64 to 80 KiB whose end comes later is an error depends on
        // how the server's reads cut it, in Redis as here.)
        let after: &[u8] = if bad.len() > 1000 { b"" } else { b"PING\r\n" };
        let input = [&b"SET a 1\r\nINCR a\r\n"[..], bad, after].concat();
        let mut both = Vec::new();
        for addr in [ours.addr, redis.addr] {
            let mut c = Client::connect(addr);
            let _ = c.stream.write_all(&input);
            both.push(c.rest());
        }
        assert_same_replies(&both[0], &both[1], &format!("case {i}"));
        assert!(
            both[0].starts_with(b"+OK\r\n:2\r\n-ERR Protocol error: "),
            "case {i}"
        );
    }
    ours.stop();
}

/// `redis-cli -p PORT args...`'s output.
fn cli(bin: &std::path::Path, addr: SocketAddr, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(bin);
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args);
    let out = match stdin {
        None => cmd.output(),
        Some(input) => {
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn redis-cli");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output()
        }
    }
    .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn redis_cli_prints_the_same_as_against_redis_server() {
    let Some(bin) = tool_or_skip("redis-cli", "redis_cli") else {
        return;
    };
    let Some(redis) = RedisServer::start("redis_cli") else {
        return;
    };
    let ours = Served::example();
    let runs: &[&[&str]] = &[
        &["SET", "k", "v"],
        &["GET", "k"],
        &["GET", "missing"],
        &["INCR", "n"],
        &["INCR", "k"],
        &["MSET", "a", "1", "b", "2 3"],
        &["MGET", "a", "b", "missing"],
        &["EXISTS", "a", "b", "missing", "a"],
        &["DEL", "a", "missing"],
        &["DBSIZE"],
        &["PING"],
        &["PING", "hello there"],
        &["ECHO", "x\ny"],
        &["PUBLISH", "ch", "m"],
        &["GET"],
        &["NOSUCH", "arg"],
        &["--raw", "MGET", "k", "n"],
    ];
    for args in runs {
        let (got, want) = (
            cli(&bin, ours.addr, args, None),
            cli(&bin, redis.addr, args, None),
        );
        assert_eq!(got, want, "redis-cli {args:?}");
    }
    // Commands on standard input (redis-cli asks for COMMAND DOCS first: an error here, which
    // it copes with).
    let input = "SET x 10\nINCR x\nGET x\nDEL x\nFOO bar\n";
    assert_eq!(
        cli(&bin, ours.addr, &[], Some(input)),
        cli(&bin, redis.addr, &[], Some(input))
    );
    ours.stop();
}

#[test]
fn redis_benchmark_runs_against_the_example_without_errors() {
    let Some(bin) = tool_or_skip("redis-benchmark", "redis_benchmark") else {
        return;
    };
    let ours = Served::example();
    let port = ours.addr.port().to_string();
    let out = Command::new(&bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "-n",
            "2000",
            "-P",
            "16",
        ])
        .args(["-t", "ping_inline,ping_mbulk,set,get", "--csv"])
        .output()
        .expect("run redis-benchmark");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET"] {
        assert!(
            stdout.contains(&format!("\"{test}\",")),
            "no {test} row:\n{stdout}\n{stderr}"
        );
    }
    assert!(!stderr.to_lowercase().contains("error"), "{stderr}");
    // 2000 requests of each test, and the CONFIG GET it asks at start.
    assert!(ours.query(|h| h.commands()) >= 4 * 2000);
    ours.stop();
}
