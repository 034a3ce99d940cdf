//! `SIGUSR2` upgrades `sockman serve` and `sockman proxy` in place under steady load (new
//! connections at a steady rate, each doing an echo, and long-lived sessions exchanging
//! requests): nothing is refused or reset, every request is answered in full, new connections
//! reach the successor, and the old process exits 0 after its drain; the same load across a
//! plain stop-and-start loses connects (else these tests would prove nothing). Also: 20
//! upgrades in a row, failed upgrades that leave the old process serving, and successors that
//! refuse bad input with a clear error.
//!
//! Every generation writes to the first one's stderr (inherited), and each log line names its
//! pid. This test process makes itself a child subreaper, so that each successor becomes its
//! child when its predecessor exits and its exit status can be checked; that is process-wide,
//! which is why these tests live in a file of their own, where every test spawns such chains.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use util::child::Bin;
use util::http::{get, value};
use util::load::{Load, Tally};
use util::{connect, echo, stat, TempDir, WAIT};

/// New connections a second in every run.
const RATE: u32 = 200;
/// Long-lived sessions in every run.
const SESSIONS: usize = 6;
/// The flags every upgraded server gets (a short leak-check period, so that a leak shows).
const COMMON: [&str; 6] = [
    "--stats-interval",
    "0",
    "--drain-timeout",
    "5s",
    "--fd-check-interval",
    "100ms",
];

/// Makes this process the reaper of orphaned descendants (the successors), once.
fn subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("become a child subreaper");
    });
}

/// The pid in a log line's header (`[... pid=N] ...`).
fn pid_of(line: &str) -> Option<u32> {
    let rest = line.split(" pid=").nth(1)?;
    rest.split(']').next()?.parse().ok()
}

/// Sends signal `name` to `pid` with `kill(1)`.
#[track_caller]
fn kill(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// Waits (at most [`WAIT`]) for `pid`, a child of this process, to exit; its exit code (`None`
/// if a signal ended it). Fails if it does not exit in time.
#[track_caller]
fn reap(pid: u32) -> Option<i32> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let pid = rustix::process::Pid::from_raw(pid as i32);
        let _ = tx.send(rustix::process::waitpid(
            pid,
            rustix::process::WaitOptions::empty(),
        ));
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(Some((_, status)))) => status.exit_status(),
        Ok(other) => panic!("waitpid {pid}: {other:?}"),
        Err(_) => panic!("pid {pid} did not exit within {WAIT:?}"),
    }
}

/// Whether `pid` is a live (not zombie) sockman process.
fn is_live_sockman(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.trim().chars().next());
    String::from_utf8_lossy(&cmdline).contains("sockman") && !matches!(state, Some('Z') | None)
}

/// The generations of one server: the first is this test's child, in `bin` (whose stderr
/// every generation shares); each later one started by its predecessor on `SIGUSR2`.
struct Chain {
    bin: Bin,
    pids: Vec<u32>,
    reaped: Vec<u32>,
}

impl Chain {
    fn spawn(args: &[&str]) -> Chain {
        Chain::from_bin(Bin::spawn(args))
    }

    fn from_bin(bin: Bin) -> Chain {
        subreaper();
        let pid = bin.pid();
        Chain {
            bin,
            pids: vec![pid],
            reaped: Vec::new(),
        }
    }

    fn current(&self) -> u32 {
        *self.pids.last().unwrap()
    }

    /// The first logged line that satisfies `found` (waiting for it at most [`WAIT`]).
    #[track_caller]
    fn logged(&mut self, what: &str, mut found: impl FnMut(&str) -> bool) -> String {
        if let Some(line) = self.bin.log.iter().find(|l| found(l)) {
            return line.clone();
        }
        self.bin.wait_line(what, found)
    }

    /// Every line `pid` logged so far.
    fn lines_of(&self, pid: u32) -> Vec<String> {
        let of = |l: &&String| pid_of(l) == Some(pid);
        self.bin.log.iter().filter(of).cloned().collect()
    }

    /// `SIGUSR2` to the current generation; waits until its successor serves (it was told to
    /// go) and returns the successor's pid.
    #[track_caller]
    fn upgrade(&mut self) -> u32 {
        let old = self.current();
        kill(old, "USR2");
        let go = format!("upgrade: serving in place of pid {old}");
        let line = self.logged("the successor's go-ahead", |l| l.contains(&go));
        let new = pid_of(&line).unwrap();
        self.pids.push(new);
        new
    }

    /// Waits for `pid` to log its final line and exit, asserts it exited 0, and returns its
    /// lines.
    #[track_caller]
    fn wait_exit(&mut self, pid: u32) -> Vec<String> {
        self.logged("the final line", |l| {
            pid_of(l) == Some(pid) && l.contains(" final ")
        });
        let code = reap(pid);
        self.reaped.push(pid);
        let lines = self.lines_of(pid);
        assert_eq!(
            code,
            Some(0),
            "pid {pid} exit code; its log:\n{}",
            lines.join("\n")
        );
        lines
    }

    /// SIGTERM to the current generation: it drains and exits 0. Returns its lines.
    #[track_caller]
    fn stop(&mut self) -> Vec<String> {
        let pid = self.current();
        kill(pid, "TERM");
        self.wait_exit(pid)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // A failed test leaves no process behind: kill what still runs (only ours, by pid).
        for &pid in &self.pids {
            if !self.reaped.contains(&pid) && is_live_sockman(pid) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The value of `key=N` in the one line of `lines` that contains `marker`, summed over every
/// such line (one per worker).
#[track_caller]
fn sum_of(lines: &[String], marker: &str, key: &str) -> u64 {
    let found: Vec<&String> = lines.iter().filter(|l| l.contains(marker)).collect();
    assert!(!found.is_empty(), "no {marker:?} in:\n{}", lines.join("\n"));
    found
        .iter()
        .map(|l| stat(l, key).unwrap_or_else(|| panic!("no {key}= in {l:?}")))
        .sum()
}

/// `GET /metrics` on `admin`: the sample `name` (unlabelled, or with `labels`).
#[track_caller]
fn metric(admin: SocketAddr, name: &str, labels: &str) -> u64 {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    value(&r.body, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in:\n{}", r.body))
}

/// `sockman_fds_unaccounted` on `admin` once it settles. In a group of workers it can differ
/// for a moment (the other workers' published counts are up to a tick old), so it is read
/// again, at most 40 times over 4 s, until it is 0; fails with the last value otherwise.
#[track_caller]
fn assert_no_leak(admin: SocketAddr, what: &str) {
    let mut last = 0;
    for _ in 0..40 {
        let r = get(admin, "/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        last = util::http::sample(&r.body, "sockman_fds_unaccounted").expect("fds_unaccounted");
        if last == 0 {
            return;
        }
        // The next leak check (every 100 ms) and publish (every tick): no event to wait on.
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: sockman_fds_unaccounted stays {last}");
}

/// No error, panic or forced drain in `log`, and no leak warning; with `workers`, a leak
/// warning is allowed if the same process says every descriptor is accounted for again (the
/// group's published counts lag under load: see `sockman::Workers`), since the settled gauge
/// is checked as well.
#[track_caller]
fn assert_clean_log(log: &[String], workers: bool) {
    let all = log.join("\n");
    for bad in ["panicked", "ERROR", "drain deadline"] {
        assert!(!all.contains(bad), "{bad:?} in the log:\n{all}");
    }
    for (i, line) in log.iter().enumerate() {
        if !line.contains("leak check:") || line.contains("accounted for again") {
            continue;
        }
        let pid = pid_of(line);
        let recovered = log[i..]
            .iter()
            .any(|l| pid_of(l) == pid && l.contains("accounted for again"));
        assert!(workers && recovered, "a leak warning: {line}\nlog:\n{all}");
    }
}

/// Open descriptors of `pid` besides one connection of this test: holds a connection to
/// `addr`, makes sure it is served (so the loop is up and has accepted it), and counts.
#[track_caller]
fn own_fds(pid: u32, addr: SocketAddr) -> usize {
    let mut held = connect(addr);
    echo(&mut held, b"count");
    util::procfs::fd_count(pid) - 1
}

/// What one upgrade under load showed.
struct Upgraded {
    tally: Tally,
    /// The old process's lines.
    old: Vec<String>,
    /// Connections the successor accepted, from its final line.
    new_accepted: u64,
}

/// Runs `args` (which include `--admin 127.0.0.1:0`), puts the load on it, upgrades it once
/// mid-run, and checks what every upgrade must show; returns the figures for more checks.
#[track_caller]
fn upgrade_under_load(args: &[&str], data: usize) -> Upgraded {
    let mut chain = Chain::spawn(&[args, &COMMON].concat());
    let (addr, admin) = chain.bin.wait_listening_with_admin();
    let old = chain.current();
    let mut load = Load::start(addr, RATE, SESSIONS);
    load.wait_echoes(100);
    let new = chain.upgrade();
    load.wait_echoes(100);
    let old_lines = chain.wait_exit(old);
    // The old process is gone: whatever comes now can only reach the successor.
    load.wait_echoes(100);
    let tally = load.stop();
    assert_no_leak(admin, "the successor");
    assert_eq!(
        metric(admin, "sockman_upgrades_total", "result=\"started\""),
        0
    );
    let new_lines = chain.stop();

    assert!(
        tally.is_clean(),
        "nothing refused, reset or cut short: {tally:?}"
    );
    assert!(tally.echoes >= 300 && tally.requests >= 50, "{tally:?}");
    let took = format!("upgrade: took over {} listeners from pid {old}:", data + 1);
    assert!(
        new_lines[0].contains(&took),
        "the successor's first line says what it took over: {:?}",
        new_lines[0]
    );
    let old_final = sum_of(&old_lines, " final ", "accepted");
    let released = sum_of(&old_lines, "handover: released", "accepted");
    assert_eq!(
        old_final, released,
        "the old process accepted nothing after the release"
    );
    let new_accepted = sum_of(&new_lines, " final ", "accepted");
    assert_eq!(
        old_final + new_accepted,
        tally.connects,
        "every connection was accepted once, by one of the two: {tally:?}"
    );
    assert!(new_accepted >= 100, "{new_accepted}");
    let old_log = old_lines.join("\n");
    assert!(
        old_log.contains("upgrades=1{succeeded=1 failed=0}"),
        "the old process counts its upgrade:\n{old_log}"
    );
    assert_clean_log(&chain.bin.log, data > 1);
    let _ = new;
    Upgraded {
        tally,
        old: old_lines,
        new_accepted,
    }
}

#[test]
fn sigusr2_upgrades_serve_under_load_refusing_and_resetting_nothing() {
    let up = upgrade_under_load(
        &["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        1,
    );
    assert!(
        up.old.iter().any(|l| l.contains("drain complete")),
        "{:?}",
        up.old
    );
    let _ = up.new_accepted;
}

#[test]
fn sigusr2_upgrades_two_workers_under_load_each_socket_to_one_worker() {
    let up = upgrade_under_load(
        &[
            "serve",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        2,
    );
    let released = up
        .old
        .iter()
        .filter(|l| l.contains("handover: released"))
        .count();
    assert_eq!(
        released, 2,
        "both workers released their socket: {:?}",
        up.old
    );
    let _ = up.tally;
}

#[test]
fn sigusr2_upgrades_the_proxy_under_load_refusing_and_resetting_nothing() {
    let (mut upstream, upstream_addr) = Bin::serve(&["--stats-interval", "0"]);
    let upstream_arg = upstream_addr.to_string();
    let up = upgrade_under_load(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &upstream_arg,
        ],
        1,
    );
    let _ = up.tally;
    upstream.terminate();
}

#[test]
fn a_plain_stop_and_start_under_the_same_load_refuses_connects() {
    let mut first = Bin::spawn(&[&["serve", "--listen", "127.0.0.1:0"][..], &COMMON].concat());
    let addr = first.wait_listening();
    let mut load = Load::start(addr, RATE, SESSIONS);
    load.wait_echoes(100);
    // Stop: the drain closes the listener (new connects are refused), serves what it has.
    first.terminate();
    let listen = addr.to_string();
    let mut second = Bin::spawn(&[&["serve", "--listen", listen.as_str()][..], &COMMON].concat());
    assert_eq!(second.wait_listening(), addr);
    load.wait_echoes(100);
    let tally = load.stop();
    second.terminate();
    eprintln!("stop and start: {tally:?}");
    assert!(
        tally.refused > 0,
        "without the handover, connects in between are refused: {tally:?}"
    );
}

#[test]
fn twenty_upgrades_in_a_row_under_load_refuse_nothing_and_leak_nothing() {
    let mut chain = Chain::spawn(
        &[
            &["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"][..],
            &COMMON,
        ]
        .concat(),
    );
    let (addr, admin) = chain.bin.wait_listening_with_admin();
    let fds_at_start = own_fds(chain.current(), addr);
    let mut load = Load::start(addr, RATE, SESSIONS);
    load.wait_echoes(40);
    for round in 0..20 {
        let old = chain.current();
        let new = chain.upgrade();
        load.wait_echoes(20);
        chain.wait_exit(old);
        assert_no_leak(admin, &format!("round {round}, pid {new}"));
    }
    let tally = load.stop();
    // The load is gone: once its connections are closed, as many descriptors as the first
    // generation had. (Closes reach the server a moment after the clients': no event to wait
    // on, so read again, at most 50 times over 2 s.)
    let mut fds = own_fds(chain.current(), addr);
    for _ in 0..50 {
        if fds == fds_at_start {
            break;
        }
        std::thread::sleep(Duration::from_millis(40));
        fds = own_fds(chain.current(), addr);
    }
    assert_eq!(fds, fds_at_start, "the 21st generation's descriptors");
    chain.stop();
    assert!(tally.is_clean(), "{tally:?}");
    assert_eq!(chain.reaped.len(), 21, "every generation exited 0");
    assert_clean_log(&chain.bin.log, false);
}

/// A copy of the binary in `dir`, to be replaced during a test, and the command that runs it as
/// `serve --listen 127.0.0.1:0` with `args` and the common flags.
fn copy_of_sockman(dir: &Path, args: &[&str]) -> (PathBuf, std::process::Command) {
    let path = dir.join("sockman");
    std::fs::copy(env!("CARGO_BIN_EXE_sockman"), &path).expect("copy the binary");
    let mut command = std::process::Command::new(&path);
    command.args([&["serve", "--listen", "127.0.0.1:0"][..], args, &COMMON].concat());
    (path, command)
}

/// Replaces the file at `path` (renaming a new file over it, as an install does) with a shell
/// script with `body`.
fn replace_with_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Replaces the file at `path` with the real binary again.
fn replace_with_sockman(path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_sockman"), &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn failed_upgrades_leave_the_old_process_serving_counted_and_a_later_one_succeeds() {
    let dir = TempDir::new("upgrade-fail");
    let args = ["--admin", "127.0.0.1:0", "--upgrade-timeout", "1s"];
    let (exe, command) = copy_of_sockman(dir.path(), &args);
    let mut chain = Chain::from_bin(Bin::from_command(command));
    let (addr, admin) = chain.bin.wait_listening_with_admin();
    let old = chain.current();
    let mut client = connect(addr);

    // 1. The new binary does not start a server at all.
    replace_with_script(&exe, "echo 'not sockman' >&2; exit 3");
    kill(old, "USR2");
    let line = chain
        .bin
        .wait_line("the first failure", |l| l.contains("upgrade failed"));
    assert!(
        line.contains("exited (exit status: 3) before it took the listeners")
            && line.contains(&format!("this process (pid {old}) keeps serving")),
        "{line}"
    );
    echo(&mut client, b"still served after a successor that exited");

    // 2. The successor's flags name another address: it refuses the listener, says why.
    replace_with_sockman(&exe);
    let wrapper = dir.path().join("wrapped");
    std::fs::rename(&exe, &wrapper).unwrap();
    replace_with_script(
        &exe,
        &format!(
            "exec {} serve --listen 127.0.0.2:{} --admin 127.0.0.1:0 --stats-interval 0",
            wrapper.display(),
            addr.port()
        ),
    );
    kill(old, "USR2");
    let line = chain
        .bin
        .wait_line("the second failure", |l| l.contains("upgrade failed"));
    assert!(
        line.contains("refused:")
            && line.contains(&format!("a listener on {addr} was handed over"))
            && line.contains("would lose its queue"),
        "{line}"
    );
    echo(&mut client, b"still served after a successor that refused");

    // 3. The successor never gets ready: killed after --upgrade-timeout; a second SIGUSR2
    //    meanwhile is refused.
    replace_with_script(&exe, "exec sleep 30");
    kill(old, "USR2");
    chain.bin.wait_line("the third start", |l| {
        l.contains("upgrade: started the successor")
    });
    kill(old, "USR2");
    chain.bin.wait_line("the refusal", |l| {
        l.contains("SIGUSR2 ignored: an upgrade is already under way")
    });
    let line = chain
        .bin
        .wait_line("the third failure", |l| l.contains("upgrade failed"));
    assert!(line.contains("was not ready within 1s"), "{line}");
    echo(&mut client, b"still served after a successor that hung");
    assert_eq!(
        metric(admin, "sockman_upgrades_total", "result=\"started\""),
        3
    );
    assert_eq!(
        metric(admin, "sockman_upgrades_total", "result=\"failed\""),
        3
    );
    assert_eq!(
        metric(admin, "sockman_upgrades_total", "result=\"succeeded\""),
        0
    );
    assert_no_leak(admin, "after three failed upgrades");

    // 4. The real binary again: this one succeeds, and the old process drains the client.
    replace_with_sockman(&exe);
    let new = chain.upgrade();
    echo(
        &mut client,
        b"the old process still serves its connection while it drains",
    );
    drop(client);
    let old_lines = chain.wait_exit(old);
    let last = old_lines.iter().rfind(|l| l.contains(" final ")).unwrap();
    assert!(last.contains("upgrades=4{succeeded=1 failed=3}"), "{last}");
    echo(&mut connect(addr), b"the successor serves");
    chain.stop();
    let _ = new;
}

#[test]
fn a_drain_during_an_upgrade_calls_it_off_and_new_connects_are_refused_as_in_any_drain() {
    let dir = TempDir::new("upgrade-drain");
    let (exe, command) = copy_of_sockman(dir.path(), &["--upgrade-timeout", "20s"]);
    let mut chain = Chain::from_bin(Bin::from_command(command));
    let addr = chain.bin.wait_listening();
    let old = chain.current();
    let mut client = connect(addr);
    echo(&mut client, b"before");
    replace_with_script(&exe, "exec sleep 30"); // a successor that never gets ready
    kill(old, "USR2");
    chain.bin.wait_line("the successor's start", |l| {
        l.contains("upgrade: started the successor")
    });
    kill(old, "TERM");
    let line = chain
        .bin
        .wait_line("the call-off", |l| l.contains("upgrade called off"));
    assert!(line.contains("this process began to drain"), "{line}");
    // The duplicates are closed: the drain's closed listener refuses, not queues.
    util::expect_refused(addr);
    echo(&mut client, b"served while draining");
    drop(client);
    let lines = chain.wait_exit(old);
    let last = lines.iter().rfind(|l| l.contains(" final ")).unwrap();
    assert!(last.contains("upgrades=1{succeeded=0 failed=1}"), "{last}");
}

#[test]
fn a_successor_whose_old_process_is_gone_says_so_and_exits_non_zero() {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sockman"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SOCKMAN_UPGRADE_FROM", "sockman-upgrade-gone-0");
    let mut bin = Bin::from_command(command);
    let log = bin.wait_failure();
    assert!(
        log.contains("sockman: SOCKMAN_UPGRADE_FROM=sockman-upgrade-gone-0: the process that started this upgrade is gone"),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}

#[test]
fn a_successor_handed_a_descriptor_that_is_not_a_listening_tcp_socket_says_so_and_exits_non_zero() {
    use rustix::net::{
        accept_with, bind, listen, recv, sendmsg, socket_with, AddressFamily, RecvFlags,
        SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
        SocketType,
    };
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    // This test plays the old process: it listens, starts the successor as its child, and
    // hands it a UDP socket described as a TCP listener.
    let name = format!("sockman-upgrade-test-{}", std::process::id());
    let sock = socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        &sock,
        &SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    listen(&sock, 1).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sockman"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upgrade-timeout",
            "5s",
        ])
        .env("SOCKMAN_UPGRADE_FROM", &name);
    let mut bin = Bin::from_command(command);
    let conn = accept_with(&sock, SocketFlags::CLOEXEC).unwrap();
    let send = |text: &str, fd: Option<std::os::fd::BorrowedFd<'_>>| {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = fd.as_slice();
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        sendmsg(
            &conn,
            &[std::io::IoSlice::new(text.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
    };
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    send(
        &format!("hello 1 pid={} listeners=1", std::process::id()),
        None,
    );
    send(&format!("listener data {addr} bound"), Some(udp.as_fd()));
    let mut buf = [0u8; 1024];
    let (n, _) = recv(&conn, &mut buf[..], RecvFlags::empty()).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        reply.starts_with("failed ") && reply.contains("is not a listening TCP socket"),
        "{reply}"
    );
    let log = bin.wait_failure();
    assert!(
        log.contains(&format!("sockman: taking over from pid {}: the descriptor for {addr} is not a listening TCP socket: not a TCP socket", std::process::id())),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}
