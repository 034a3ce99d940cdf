//! Stop means stopped: work another thread was told was accepted (`Ok`) is done, even when the
//! stop comes before its turn; from the moment a stop is asked for (by a `Handle`, or by a
//! callback through `Context::shutdown`), every sender gets `RemoteError::Stopped`, while the
//! `Server` value is still alive. A producer that retries on `Full` ends.

mod util;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockman::{CloseReason, ConnId, Context, Handler, RemoteError};
use util::{local_config, turn_until_at};

/// Records its connections; a byte `q` asks the server to stop from the callback.
#[derive(Default)]
struct Recorder {
    ids: Vec<ConnId>,
    jobs_run: u32,
}

impl Handler for Recorder {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        if data.contains(&b'q') {
            ctx.write(b"bye\n");
            ctx.shutdown();
        }
    }
}

/// A server with one accepted connection, turned by the test at a fixed virtual time.
fn one_connection() -> (
    sockman::Server<Recorder>,
    Instant,
    std::net::TcpStream,
    ConnId,
) {
    let (mut server, addr) = util::bind(local_config(), Recorder::default());
    let t0 = server.now();
    let client = util::connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| {
        s.handler().ids.len() == 1
    });
    let id = server.handler().ids[0];
    (server, t0, client, id)
}

#[test]
fn work_accepted_before_shutdown_is_done_before_the_stop() {
    let (mut server, t0, mut client, id) = one_connection();
    let handle = server.handle();
    let remote = server.remote();
    // "Send goodbye, then shut down", from another thread, all before the loop's next turn.
    let h = handle.clone();
    std::thread::spawn(move || {
        h.send(id, b"goodbye\n".to_vec())
            .expect("accepted before the stop");
        remote
            .run(|handler, _ctx| handler.jobs_run += 1)
            .expect("accepted before the stop");
        h.shutdown();
    })
    .join()
    .unwrap();
    turn_until_at(&mut server, t0, "the stop", |s| s.is_stopped());
    assert_eq!(server.handler().jobs_run, 1, "the accepted job ran");
    let m = server.metrics();
    assert_eq!(m.remote_dropped, 0, "{m}");
    assert_eq!(m.closed_by(CloseReason::Shutdown), 1, "{m}");
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"goodbye\n", "the goodbye arrives before the EOF");
}

#[test]
fn after_shutdown_every_sender_is_refused_while_the_server_lives() {
    let (mut server, t0, _client, id) = one_connection();
    let handle = server.handle();
    let remote = server.remote();
    handle.shutdown();
    // Not one turn yet: the server has not acted on it, but the stop is asked for.
    assert!(
        matches!(handle.send(id, b"late".to_vec()), Err(RemoteError::Stopped(d)) if d == b"late")
    );
    assert_eq!(handle.close(id), Err(RemoteError::Stopped(())));
    assert!(matches!(
        remote.run(|_, _| {}),
        Err(RemoteError::Stopped(()))
    ));
    turn_until_at(&mut server, t0, "the stop", |s| s.is_stopped());
    // Stopped, and the `Server` value still alive: still refused, never `Ok` for nothing.
    assert!(matches!(
        handle.send(id, vec![1]),
        Err(RemoteError::Stopped(_))
    ));
    assert!(matches!(
        remote.run(|_, _| {}),
        Err(RemoteError::Stopped(()))
    ));
    assert_eq!(server.handler().jobs_run, 0);
}

#[test]
fn a_producer_that_retries_on_full_ends_at_the_stop() {
    let config = sockman::Config {
        remote_queue: 8,
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, Recorder::default());
    let t0 = server.now();
    let _client = util::connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| {
        s.handler().ids.len() == 1
    });
    let id = server.handler().ids[0];
    let handle = server.handle();
    let done = Arc::new(AtomicBool::new(false));
    let producer = {
        let (handle, done) = (handle.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let bound = Instant::now() + Duration::from_secs(20);
            let (mut sent, mut full) = (0u64, 0u64);
            loop {
                assert!(Instant::now() < bound, "the producer never ended");
                match handle.send(id, vec![b'x'; 8]) {
                    Ok(()) => sent += 1,
                    Err(RemoteError::Full(_)) => {
                        full += 1;
                        std::thread::yield_now();
                    }
                    Err(RemoteError::Stopped(_)) => break,
                }
            }
            done.store(true, Ordering::Release);
            (sent, full)
        })
    };
    // The queue (8) fills at once; turns drain it; then the stop, and no more turns.
    turn_until_at(&mut server, t0, "some messages", |s| {
        s.metrics().bytes_out >= 8 * 100
    });
    handle.shutdown();
    turn_until_at(&mut server, t0, "the stop", |s| s.is_stopped());
    let (sent, full) = producer.join().expect("the producer ended");
    assert!(done.load(Ordering::Acquire));
    assert!(full > 0, "the queue was full at times ({sent} sent)");
    // Every message that was accepted was written (none dropped, the connection was open).
    let m = server.metrics();
    assert_eq!(m.remote_dropped, 0, "{m}");
    assert_eq!(m.bytes_out, 8 * sent, "{m}");
}

#[test]
fn a_callback_can_stop_the_server() {
    let (mut server, t0, mut client, id) = one_connection();
    let handle = server.handle();
    std::io::Write::write_all(&mut client, b"q").unwrap();
    turn_until_at(&mut server, t0, "the stop", |s| s.is_stopped());
    assert!(matches!(
        handle.send(id, vec![1]),
        Err(RemoteError::Stopped(_))
    ));
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"bye\n",
        "what the callback wrote before stopping arrives"
    );
    assert_eq!(server.metrics().closed_by(CloseReason::Shutdown), 1);
}

#[test]
fn serve_keeps_the_server_and_its_handler_for_afterwards() {
    let (server, addr) = util::bind(local_config(), Recorder::default());
    let serving = std::thread::spawn(move || {
        let mut server = server;
        server.serve().expect("serve");
        server
    });
    let mut client = util::connect(addr);
    std::io::Write::write_all(&mut client, b"q").unwrap(); // the handler stops the server
    let server = serving.join().expect("the serving thread");
    assert!(server.is_stopped());
    assert_eq!(
        server.handler().ids.len(),
        1,
        "the handler's state is still there"
    );
    assert_eq!(server.metrics().closed_by(CloseReason::Shutdown), 1);
}

/// Asks the server to stop when a connection closes.
struct StopOnClose;

impl Handler for StopOnClose {
    type Conn = ();
    fn on_open(&mut self, _ctx: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _ctx: &mut Context<'_>, _data: &[u8]) {}
    fn on_close(&mut self, _: (), ctx: &mut Context<'_>, _reason: CloseReason) {
        ctx.shutdown();
    }
}

#[test]
fn a_stop_asked_between_turns_is_the_next_turns_first_work() {
    let config = sockman::Config {
        drain_idle: Duration::from_millis(10),
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, StopOnClose);
    let t0 = server.now();
    let _client = util::connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().accepted == 1);
    let t1 = t0 + Duration::from_millis(100);
    util::step(&mut server, t1);
    // Between turns: the drain closes the connection, idle since t0, at once, and its
    // on_close asks for the stop. The next turn must not wait for anything: it has the stop
    // to do.
    server.drain(Duration::from_secs(60));
    assert_eq!(server.metrics().closed_total(), 1, "{}", server.metrics());
    assert_eq!(server.poll_delay(t1), Some(Duration::ZERO));
    util::step(&mut server, t1);
    assert!(server.is_stopped());
}
