//! How `livetrace dump` reaches a running recorder: a unix socket of mode 0600, in a directory
//! of mode 0700, so that only the recorder's owner (root) can connect; the recorder also checks
//! the peer's uid. One request per connection, one JSON line each way: the window and the output
//! paths (made absolute by `dump`), then what was written or why not. The recorder writes the
//! files itself (its owner asked for them), between its bucket cuts, so a dump never pauses
//! the recording for longer than writing takes, and two dumps at once are answered in turn.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use clap::Args as ClapArgs;
use serde::{Deserialize, Serialize};

use crate::{duration::parse_positive_duration, output::OutputSpec};

/// How long the recorder waits for a request's line (the recording goes on in the kernel
/// meanwhile), and for its reply to be taken.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long `dump` waits for the answer: writing a large window takes a while.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize)]
struct WireRequest {
    /// Seconds since the Unix epoch.
    from: Option<f64>,
    to: Option<f64>,
    /// Seconds before `to` (or now).
    last: Option<f64>,
    outputs: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    text: String,
}

/// A dump's request, as the recorder reads it.
pub struct Request {
    pub from: Option<SystemTime>,
    pub to: Option<SystemTime>,
    pub last: Option<Duration>,
    pub outputs: Vec<OutputSpec>,
}

/// The recorder's end. Requests are read without blocking, a little at each of the capture
/// loop's ticks, so a client that connects and says nothing never holds the recording up.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Connections whose request has not fully arrived: since when, and what came so far.
    pending: Vec<(Client, Instant, Vec<u8>)>,
}

/// The longest request read: a bound against a client that never ends its line.
const MAX_REQUEST: usize = 64 * 1024;

impl Server {
    /// Listens at `path`, refusing if a recorder already does; a socket left by one that died
    /// is replaced (never another kind of file).
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::FileTypeExt as _;
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .with_context(|| format!("cannot create {} for the socket", dir.display()))?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                anyhow::bail!(
                    "{} exists and is not a socket: give --socket a path of its own",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "a recorder is already listening on {}: stop it, or give this one \
                     another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        // Created 0600 from the start: no instant in which another user could connect.
        // SAFETY: umask has no preconditions; the old mask is restored right after.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            pending: Vec::new(),
        })
    }

    /// Removes the socket's name: no new dump can connect; those already connected can still
    /// be answered.
    pub fn close(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The requests that have fully arrived, each with its client to answer (or why it cannot
    /// be read). Accepts new connections and reads what has come, without waiting.
    pub fn poll(&mut self) -> Vec<(Client, anyhow::Result<Request>)> {
        while let Ok((stream, _)) = self.listener.accept() {
            let mut client = Client { stream };
            match peer_uid(&client.stream) {
                // SAFETY: geteuid has no preconditions.
                Some(uid) if uid == 0 || uid == unsafe { libc::geteuid() } => {
                    let _ = client.stream.set_nonblocking(true);
                    self.pending.push((client, Instant::now(), Vec::new()));
                }
                uid => client.reply(Err(anyhow::anyhow!(
                    "refused: uid {uid:?} is not the recorder's owner"
                ))),
            }
        }
        let mut ready = Vec::new();
        let mut waiting = Vec::new();
        for (mut client, since, mut bytes) in std::mem::take(&mut self.pending) {
            match client.read_more(&mut bytes) {
                Some(result) => ready.push((client, result)),
                None if since.elapsed() >= TIMEOUT => ready.push((
                    client,
                    Err(anyhow::anyhow!("no request came within {TIMEOUT:?}")),
                )),
                None => waiting.push((client, since, bytes)),
            }
        }
        self.pending = waiting;
        ready
    }

    /// After [`Server::close`]: every request still to come from connected clients, waiting
    /// for each at most as long as a request may take.
    pub fn last_requests(&mut self) -> Vec<(Client, anyhow::Result<Request>)> {
        let mut all = Vec::new();
        let deadline = Instant::now() + TIMEOUT + Duration::from_millis(100);
        loop {
            all.extend(self.poll());
            if self.pending.is_empty() || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The uid of the process at the other end (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for the kernel to write a ucred into.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// One connected `dump`.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Reads what has arrived; the request once its line is complete (or why it is not one).
    fn read_more(&mut self, bytes: &mut Vec<u8>) -> Option<anyhow::Result<Request>> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(Err(anyhow::anyhow!("the client hung up before asking"))),
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Some(Err(anyhow::Error::from(err).context("reading a request")));
                }
            }
            if bytes.len() > MAX_REQUEST {
                return Some(Err(anyhow::anyhow!(
                    "a request longer than {MAX_REQUEST} bytes"
                )));
            }
        }
        let end = bytes.iter().position(|&b| b == b'\n')?;
        Some(parse_request(&bytes[..end]))
    }

    pub fn reply(&mut self, result: anyhow::Result<String>) {
        let reply = match result {
            Ok(text) => WireReply { ok: true, text },
            Err(err) => WireReply {
                ok: false,
                text: format!("{err:#}"),
            },
        };
        let _ = self.stream.set_nonblocking(false);
        let _ = self.stream.set_write_timeout(Some(TIMEOUT));
        if let Ok(mut line) = serde_json::to_string(&reply) {
            line.push('\n');
            let _ = self.stream.write_all(line.as_bytes());
        }
    }
}

fn parse_request(line: &[u8]) -> anyhow::Result<Request> {
    let wire: WireRequest = serde_json::from_slice(line).context("a malformed request")?;
    let outputs = wire
        .outputs
        .iter()
        .map(|o| OutputSpec::parse(o).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    Ok(Request {
        from: wire.from.map(time).transpose()?,
        to: wire.to.map(time).transpose()?,
        last: wire.last.map(seconds).transpose()?,
        outputs,
    })
}

/// A span of seconds as a request gives it: finite, not negative, not absurd.
fn seconds(value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{value} is not a span of seconds"))
}

/// A time as a request gives it: seconds since the Unix epoch.
fn time(value: f64) -> anyhow::Result<SystemTime> {
    SystemTime::UNIX_EPOCH
        .checked_add(seconds(value)?)
        .ok_or_else(|| anyhow::anyhow!("{value} is not a time"))
}

const DUMP_EXAMPLES: &str = "\
Examples:
  livetrace dump --last 2m -o last.svg            # on-CPU to last.svg, off-CPU to last.offcpu.svg
  livetrace dump --from 12:03:00 --to 12:03:30 -o spike.pprof -o spike.folded
  livetrace dump -o all.json                      # everything the recorder keeps
Times are UTC, as the recorder's notes print them: HH:MM[:SS] (the last such time: today's, or
yesterday's if today's is still to come), or @UNIX_SECONDS.";

/// `livetrace dump`: write a window of a running `livetrace record`.
#[derive(ClapArgs, Debug)]
#[command(after_help = DUMP_EXAMPLES)]
pub struct DumpArgs {
    /// The last DUR (before --to, or now).
    #[arg(long = "last", value_name = "DUR", value_parser = parse_positive_duration,
          conflicts_with = "from")]
    pub last: Option<Duration>,
    #[arg(long = "from", value_name = "TIME", value_parser = parse_time)]
    pub from: Option<SystemTime>,
    #[arg(long = "to", value_name = "TIME", value_parser = parse_time)]
    pub to: Option<SystemTime>,
    /// Where to write (any format, by extension); the off-CPU profile goes beside each.
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = OutputSpec::parse,
          required = true)]
    pub outputs: Vec<OutputSpec>,
    /// The recorder's socket.
    #[arg(long = "socket", value_name = "PATH", default_value = super::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `HH:MM[:SS]` (UTC, the last such time) or `@UNIX_SECONDS`.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("'{text}' is not a time: give HH:MM[:SS] (UTC, today) or @UNIX_SECONDS");
    if let Some(secs) = text.strip_prefix('@') {
        let secs: f64 = secs.parse().map_err(|_| bad())?;
        return time(secs).map_err(|_| bad());
    }
    let parts: Vec<u64> = text
        .split(':')
        .map(|p| p.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (h, m, s) = match parts[..] {
        [h, m] => (h, m, 0),
        [h, m, s] => (h, m, s),
        _ => return Err(bad()),
    };
    if h > 23 || m > 59 || s > 59 {
        return Err(bad());
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Today's, unless that is still to come: then yesterday's (23:58 asked at 00:05).
    let mut at = now - now % 86_400 + h * 3600 + m * 60 + s;
    if at > now + 60 {
        at -= 86_400;
    }
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(at))
}

pub fn dump(args: DumpArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (args.from, args.to)
        && from >= to
    {
        return Err(crate::UsageError::error(
            "--from is not before --to: give the window's start first",
        ));
    }
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let outputs = args
        .outputs
        .iter()
        .map(|o| match &o.path {
            Some(path) => Ok(cwd.join(path).to_string_lossy().into_owned()),
            None => Err(crate::UsageError::error(
                "dump writes files only (-o -, standard output, is the recorder's)",
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = WireRequest {
        from: args.from.map(seconds),
        to: args.to.map(seconds),
        last: args.last.map(|d| d.as_secs_f64()),
        outputs,
    };
    let socket = &args.socket;
    let mut stream = UnixStream::connect(socket).map_err(|err| match err.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot open {}: permission denied: only the recorder's owner (root) may dump",
            socket.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no recorder is listening on {}: start `livetrace record`, or give its --socket",
            socket.display()
        ),
        _ => anyhow::anyhow!("cannot connect to {}: {err}", socket.display()),
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending the request to the recorder")?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("reading the recorder's answer")?;
    let reply: WireReply = serde_json::from_str(&answer)
        .with_context(|| format!("the recorder on {} did not answer", socket.display()))?;
    if !reply.ok {
        anyhow::bail!("the recorder says: {}", reply.text);
    }
    crate::say_raw!("{}", reply.text);
    Ok(())
}

/// Removes the oldest files of `dir` whose names start with `prefix` beyond `keep` of each kind
/// (on-CPU, and `.offcpu.` off-CPU). Names hold their UTC time, so they sort by age.
pub fn remove_oldest(dir: &Path, prefix: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    for offcpu in [false, true] {
        let kind: Vec<&String> = names
            .iter()
            .filter(|n| n.contains(".offcpu.") == offcpu)
            .collect();
        for name in kind.iter().take(kind.len().saturating_sub(keep)) {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
}
