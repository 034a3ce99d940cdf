//! The commands, each answering exactly as redis-server 7.0 does (the checks in the order of
//! its `processCommand`: does the command exist, its arity, then whether it may run in
//! subscribed mode).

use sockman::{Bytes, Context};

use super::db::{cstr, Args, Db, Value};
use super::parse::string2ll;
use super::pubsub::PubSub;
use super::reply::{itoa, Out, SHARE_MIN};
use super::Client;

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Flush what is staged, then close (`QUIT`).
    Close,
}

/// The commands this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Ping,
    Echo,
    Set,
    Get,
    Del,
    Exists,
    Incr,
    Mget,
    Mset,
    Dbsize,
    Subscribe,
    Unsubscribe,
    Publish,
    Quit,
    Reset,
    Config,
    ConfigGet,
}

impl Cmd {
    /// The command named `name` (any case).
    pub fn lookup(name: &[u8]) -> Option<Cmd> {
        let mut up = [0u8; 11];
        if name.len() > up.len() {
            return None;
        }
        for (u, c) in up.iter_mut().zip(name) {
            *u = c.to_ascii_uppercase();
        }
        Some(match &up[..name.len()] {
            b"GET" => Cmd::Get,
            b"SET" => Cmd::Set,
            b"PING" => Cmd::Ping,
            b"ECHO" => Cmd::Echo,
            b"DEL" => Cmd::Del,
            b"EXISTS" => Cmd::Exists,
            b"INCR" => Cmd::Incr,
            b"MGET" => Cmd::Mget,
            b"MSET" => Cmd::Mset,
            b"DBSIZE" => Cmd::Dbsize,
            b"SUBSCRIBE" => Cmd::Subscribe,
            b"UNSUBSCRIBE" => Cmd::Unsubscribe,
            b"PUBLISH" => Cmd::Publish,
            b"QUIT" => Cmd::Quit,
            b"RESET" => Cmd::Reset,
            b"CONFIG" => Cmd::Config,
            _ => return None,
        })
    }

    /// Redis's full name (what its errors quote).
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Ping => "ping",
            Cmd::Echo => "echo",
            Cmd::Set => "set",
            Cmd::Get => "get",
            Cmd::Del => "del",
            Cmd::Exists => "exists",
            Cmd::Incr => "incr",
            Cmd::Mget => "mget",
            Cmd::Mset => "mset",
            Cmd::Dbsize => "dbsize",
            Cmd::Subscribe => "subscribe",
            Cmd::Unsubscribe => "unsubscribe",
            Cmd::Publish => "publish",
            Cmd::Quit => "quit",
            Cmd::Reset => "reset",
            Cmd::Config => "config",
            Cmd::ConfigGet => "config|get",
        }
    }

    /// Redis's arity: `n` exactly, or `-n` for at least `n` (the name included).
    fn arity(self) -> i32 {
        match self {
            Cmd::Echo | Cmd::Get | Cmd::Incr => 2,
            Cmd::Dbsize | Cmd::Reset => 1,
            Cmd::Publish => 3,
            Cmd::Ping | Cmd::Unsubscribe | Cmd::Quit => -1,
            Cmd::Del | Cmd::Exists | Cmd::Mget | Cmd::Subscribe | Cmd::Config => -2,
            Cmd::Set | Cmd::Mset | Cmd::ConfigGet => -3,
        }
    }

    /// Whether a RESP2 connection in subscribed mode may run it.
    fn in_subscribed_mode(self) -> bool {
        matches!(
            self,
            Cmd::Ping | Cmd::Subscribe | Cmd::Unsubscribe | Cmd::Quit | Cmd::Reset
        )
    }
}

/// The server's data and what its commands need: the keyspace, the channels, the staged
/// replies of the connection being served, scratch space.
#[derive(Debug, Default)]
pub struct Store {
    pub db: Db,
    pub pubsub: PubSub,
    pub out: Out,
    /// A message being published, framed once for all its receivers.
    frame: Vec<u8>,
    /// Commands run.
    pub commands: u64,
}

impl Store {
    /// Runs one request.
    pub fn exec(&mut self, ctx: &mut Context<'_, Client>, args: &Args<'_>) -> Flow {
        self.commands += 1;
        let Some(mut cmd) = Cmd::lookup(args.get(0)) else {
            self.unknown_command(args);
            return Flow::Continue;
        };
        if cmd == Cmd::Config && args.len() >= 2 {
            if args.get(1).eq_ignore_ascii_case(b"GET") {
                cmd = Cmd::ConfigGet;
            } else {
                let name = cstr(args.get(0)).to_ascii_uppercase();
                let sub = cstr(args.get(1));
                self.out.error(&[
                    b"unknown subcommand '",
                    &sub[..sub.len().min(128)],
                    b"'. Try ",
                    &name,
                    b" HELP.",
                ]);
                return Flow::Continue;
            }
        }
        let (argc, arity) = (args.len() as i32, cmd.arity());
        if (arity > 0 && argc != arity) || argc < -arity {
            self.arity_error(cmd);
            return Flow::Continue;
        }
        if self.pubsub.count(ctx.id()) > 0 && !cmd.in_subscribed_mode() {
            self.out.error(&[
                b"Can't execute '",
                cmd.name().as_bytes(),
                b"': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            ]);
            return Flow::Continue;
        }
        match cmd {
            Cmd::Get => match self.db.get(args.get(1)) {
                Some(Value::Small { len, bytes }) => self.out.bulk(&bytes[..*len as usize]),
                Some(Value::Big(b)) => self.out.shared(ctx, b),
                None => self.out.nil(),
            },
            Cmd::Set => self.set(ctx, args),
            Cmd::Ping => self.ping(ctx, args),
            Cmd::Echo => self.echo(ctx, args, 1),
            Cmd::Del => {
                let mut n = 0;
                for i in 1..args.len() {
                    n += i64::from(self.db.remove(args.get(i)).is_some());
                }
                self.out.int(n);
            }
            Cmd::Exists => {
                let n = (1..args.len())
                    .filter(|&i| self.db.contains_key(args.get(i)))
                    .count();
                self.out.int(n as i64);
            }
            Cmd::Incr => self.incr(args),
            Cmd::Mget => {
                self.out.array(args.len() - 1);
                for i in 1..args.len() {
                    match self.db.get(args.get(i)) {
                        Some(Value::Small { len, bytes }) => self.out.bulk(&bytes[..*len as usize]),
                        Some(Value::Big(b)) => self.out.shared(ctx, b),
                        None => self.out.nil(),
                    }
                    self.out.spill(ctx);
                }
            }
            Cmd::Mset => {
                if args.len().is_multiple_of(2) {
                    self.arity_error(cmd);
                    return Flow::Continue;
                }
                for i in (1..args.len()).step_by(2) {
                    self.store(args.get(i), args.value(i + 1));
                }
                self.out.ok();
            }
            Cmd::Dbsize => self.out.int(self.db.len() as i64),
            Cmd::Subscribe => {
                for i in 1..args.len() {
                    let n = self.pubsub.subscribe(ctx.id(), args.get(i));
                    self.confirm(b"subscribe", Some(args.get(i)), n);
                }
            }
            Cmd::Unsubscribe => {
                if args.len() == 1 {
                    let all = self.pubsub.unsubscribe_all(ctx.id());
                    if all.is_empty() {
                        self.confirm(b"unsubscribe", None, 0);
                    }
                    for (i, channel) in all.iter().enumerate() {
                        self.confirm(b"unsubscribe", Some(channel), all.len() - i - 1);
                    }
                } else {
                    for i in 1..args.len() {
                        let n = self.pubsub.unsubscribe(ctx.id(), args.get(i));
                        self.confirm(b"unsubscribe", Some(args.get(i)), n);
                    }
                }
            }
            Cmd::Publish => self.publish(ctx, args.get(1), args.get(2)),
            Cmd::Quit => {
                self.out.ok();
                return Flow::Close;
            }
            Cmd::Reset => {
                self.pubsub.unsubscribe_all(ctx.id());
                self.out.raw(b"+RESET\r\n");
            }
            Cmd::ConfigGet => self.config_get(args),
            Cmd::Config => unreachable!("CONFIG alone fails its arity check"),
        }
        Flow::Continue
    }

    fn arity_error(&mut self, cmd: Cmd) {
        self.out.error(&[
            b"wrong number of arguments for '",
            cmd.name().as_bytes(),
            b"' command",
        ]);
    }

    /// Redis's `unknown command '<name>', with args beginning with: '<arg>' ...`: the name and
    /// the arguments as C strings, the name cut at 128 bytes, the list at about 128.
    fn unknown_command(&mut self, args: &Args<'_>) {
        let name = cstr(args.get(0));
        let mut list = Vec::new();
        for i in 1..args.len() {
            if list.len() >= 128 {
                break;
            }
            let arg = cstr(args.get(i));
            let room = 128 - list.len();
            list.push(b'\'');
            list.extend_from_slice(&arg[..arg.len().min(room)]);
            list.extend_from_slice(b"' ");
        }
        self.out.error(&[
            b"unknown command '",
            &name[..name.len().min(128)],
            b"', with args beginning with: ",
            &list,
        ]);
    }

    fn ping(&mut self, ctx: &mut Context<'_, Client>, args: &Args<'_>) {
        if args.len() > 2 {
            return self.arity_error(Cmd::Ping);
        }
        if self.pubsub.count(ctx.id()) > 0 {
            self.out.raw(b"*2\r\n$4\r\npong\r\n");
            if args.len() == 2 {
                self.echo(ctx, args, 1);
            } else {
                self.out.raw(b"$0\r\n\r\n");
            }
        } else if args.len() == 2 {
            self.echo(ctx, args, 1);
        } else {
            self.out.raw(b"+PONG\r\n");
        }
    }

    /// Argument `i` as a bulk reply (a long one without a copy per reply when it can be).
    fn echo(&mut self, ctx: &mut Context<'_, Client>, args: &Args<'_>, i: usize) {
        let arg = args.get(i);
        if arg.len() < SHARE_MIN {
            self.out.bulk(arg);
        } else {
            self.out.shared(ctx, &args.bytes(i));
        }
    }

    /// Stores `value` under `key`, reusing the key's allocation when it exists.
    fn store(&mut self, key: &[u8], value: Value) {
        match self.db.raw_entry_mut().from_key(key) {
            hashbrown::hash_map::RawEntryMut::Occupied(mut e) => {
                e.insert(value);
            }
            hashbrown::hash_map::RawEntryMut::Vacant(e) => {
                e.insert(key.into(), value);
            }
        }
    }

    /// `SET key value [NX|XX] [GET] [KEEPTTL]`, with Redis's option parsing (an option is
    /// compared as a C string; NX and XX exclude each other). The expiry options parse as in
    /// Redis but are refused: this server keeps no expiry times.
    fn set(&mut self, ctx: &mut Context<'_, Client>, args: &Args<'_>) {
        let (mut nx, mut xx, mut get) = (false, false, false);
        let (mut keep_ttl, mut expiry) = (false, false);
        let mut i = 3;
        while i < args.len() {
            let opt = cstr(args.get(i));
            let has_next = i + 1 < args.len();
            if opt.eq_ignore_ascii_case(b"NX") && !xx {
                nx = true;
            } else if opt.eq_ignore_ascii_case(b"XX") && !nx {
                xx = true;
            } else if opt.eq_ignore_ascii_case(b"GET") {
                get = true;
            } else if opt.eq_ignore_ascii_case(b"KEEPTTL") && !expiry {
                // No key has a time to live here: keeping it is what happens anyway.
                keep_ttl = true;
            } else if [&b"EX"[..], b"PX", b"EXAT", b"PXAT"]
                .iter()
                .any(|o| opt.eq_ignore_ascii_case(o))
                && !expiry
                && !keep_ttl
                && has_next
            {
                expiry = true;
                i += 1;
            } else {
                return self.out.error(&[b"syntax error"]);
            }
            i += 1;
        }
        if expiry {
            return self.out.error(&[
                b"SET with an expiry (EX, PX, EXAT, PXAT) is not supported by this server",
            ]);
        }
        let key = args.get(1);
        if get {
            match self.db.get(key) {
                Some(Value::Small { len, bytes }) => self.out.bulk(&bytes[..*len as usize]),
                Some(Value::Big(b)) => self.out.shared(ctx, b),
                None => self.out.nil(),
            }
        }
        let found = self.db.contains_key(key);
        if (nx && found) || (xx && !found) {
            if !get {
                self.out.nil();
            }
            return;
        }
        self.store(key, args.value(2));
        if !get {
            self.out.ok();
        }
    }

    fn incr(&mut self, args: &Args<'_>) {
        let key = args.get(1);
        let old = match self.db.get(key) {
            None => 0,
            Some(v) => match string2ll(v.as_slice()) {
                Some(n) => n,
                None => {
                    return self
                        .out
                        .error(&[b"value is not an integer or out of range"])
                }
            },
        };
        let Some(new) = old.checked_add(1) else {
            return self.out.error(&[b"increment or decrement would overflow"]);
        };
        let mut digits = [0; 20];
        self.store(key, Value::copy(itoa(new, &mut digits)));
        self.out.int(new);
    }

    /// `*3 <kind> <channel or nil> :<count>`.
    fn confirm(&mut self, kind: &[u8], channel: Option<&[u8]>, count: usize) {
        self.out.raw(b"*3\r\n");
        self.out.bulk(kind);
        match channel {
            Some(c) => self.out.bulk(c),
            None => self.out.nil(),
        }
        self.out.int(count as i64);
    }

    /// Frames the message once and queues it on every subscriber (copied when short, as one
    /// shared buffer when long); replies with the number of receivers.
    fn publish(&mut self, ctx: &mut Context<'_, Client>, channel: &[u8], msg: &[u8]) {
        let ids = self.pubsub.subscribers(channel);
        if !ids.is_empty() {
            let frame = &mut self.frame;
            frame.clear();
            frame.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n");
            let mut digits = [0; 20];
            for part in [channel, msg] {
                frame.push(b'$');
                frame.extend_from_slice(itoa(part.len() as i64, &mut digits));
                frame.extend_from_slice(b"\r\n");
                frame.extend_from_slice(part);
                frame.extend_from_slice(b"\r\n");
            }
            if frame.len() < SHARE_MIN {
                for &id in ids {
                    let _ = ctx.send(id, frame);
                }
            } else {
                let shared = Bytes::copy_from_slice(frame);
                for &id in ids {
                    let _ = ctx.send_shared(id, shared.clone());
                }
            }
        }
        self.out.int(ids.len() as i64);
    }

    /// `CONFIG GET parameter...`: this server's two settings a client asks about
    /// (redis-benchmark does at start): `save` (nothing is saved) and `appendonly` (`no`). A
    /// parameter is a name (any case, answered as asked) or a glob pattern (answered with the
    /// setting's name); others match nothing.
    fn config_get(&mut self, args: &Args<'_>) {
        const SETTINGS: [(&[u8], &[u8]); 2] = [(b"appendonly", b"no"), (b"save", b"")];
        let mut found: Vec<(&[u8], &[u8])> = Vec::new();
        for i in 2..args.len() {
            let p = args.get(i);
            let glob = p.iter().any(|c| matches!(c, b'*' | b'?' | b'['));
            for (name, value) in SETTINGS {
                let hit = if glob {
                    glob_match(p, name)
                } else {
                    p.eq_ignore_ascii_case(name)
                };
                if hit && !found.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    found.push((if glob { name } else { p }, value));
                }
            }
        }
        self.out.array(found.len() * 2);
        for (name, value) in found {
            self.out.bulk(name);
            self.out.bulk(value);
        }
    }
}

/// A glob match, case-insensitive (`*`, `?`, `[...]` with ranges and `^`, `\` escapes), as
/// Redis's `stringmatchlen` with `nocase`.
fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let lower = |c: u8| c.to_ascii_lowercase();
    match pattern.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob_match(rest, &s[1..]),
        Some((b'[', rest)) => {
            let Some((&c, tail)) = s.split_first() else {
                return false;
            };
            let (negate, mut p) = match rest.split_first() {
                Some((b'^', r)) => (true, r),
                _ => (false, rest),
            };
            let mut hit = false;
            while let Some((&first, r)) = p.split_first() {
                if first == b']' {
                    p = r;
                    break;
                }
                if first == b'\\' && !r.is_empty() {
                    hit |= lower(r[0]) == lower(c);
                    p = &r[1..];
                } else if r.len() >= 2 && r[0] == b'-' {
                    let (a, b) = (lower(first).min(lower(r[1])), lower(first).max(lower(r[1])));
                    hit |= (a..=b).contains(&lower(c));
                    p = &r[2..];
                } else {
                    hit |= lower(first) == lower(c);
                    p = r;
                }
            }
            hit != negate && glob_match(p, tail)
        }
        Some((b'\\', rest)) if !rest.is_empty() => {
            !s.is_empty() && lower(rest[0]) == lower(s[0]) && glob_match(&rest[1..], &s[1..])
        }
        Some((&c, rest)) => !s.is_empty() && lower(c) == lower(s[0]) && glob_match(rest, &s[1..]),
    }
}
