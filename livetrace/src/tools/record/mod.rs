//! `livetrace record`: the flight recorder. Always on at a low rate, it keeps the last `--keep`
//! of on-CPU samples and off-CPU time in time buckets, within `--max-memory`, so that "what was
//! it doing 30 seconds ago" has an answer after the fact. `livetrace dump` (through a unix
//! socket only root can open), SIGUSR1, and the end of the recording write any window of it to
//! any output format; `--write-every` writes rotated pprof files for continuous-profiling
//! backends. It runs `profile`'s and `offcpu`'s programs in one session; each bucket is taken
//! out of their maps and symbolised when it is cut, so the kernel's maps and the symbolisation
//! caches stay bounded however long it runs.

mod socket;
mod store;
mod timeline;

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use aya::Ebpf;
use clap::Args as ClapArgs;
use livetrace_common::control;

pub use self::socket::{DumpArgs, dump};
use self::{
    socket::{Request, Server},
    store::{Kind, Store},
    timeline::Timeline,
};
use crate::{
    duration::parse_positive_duration,
    model::StackProfile,
    output::{self, OutputSpec},
    session::{
        self, Privileges, Running, Session, Tool,
        capture::{Event, StopReason},
        targets::{Target, TargetArgs},
    },
    stacks,
    tools::{offcpu, profile},
    unwind::UnwindArgs,
};

const EXAMPLES: &str = "\
Examples:
  livetrace record -p 1234                       # keep the last 10 minutes of pid 1234
  livetrace dump --last 2m -o before.svg         # from another shell: the last 2 minutes
  livetrace dump --from 12:03:00 --to 12:03:30 -o spike.pprof
  livetrace record --keep 1h --bucket 30s --max-memory 256m   # the whole system
  livetrace record -p 1234 --write-every 1m --dir /var/lib/livetrace --max-files 60
  kill -USR1 $(pidof livetrace)                  # write the -o outputs now, keep recording";

/// The names of --write-every's files: this, the UTC time their window starts (to the
/// millisecond), `.pb.gz` (`.offcpu.pb.gz`).
const ROTATED_PREFIX: &str = "livetrace-record-";

/// Buckets are cut on the capture loop's tick.
const MIN_BUCKET: Duration = Duration::from_millis(250);

/// The default socket, which `dump` finds without being told.
pub const DEFAULT_SOCKET: &str = "/run/livetrace/record.sock";

#[derive(ClapArgs, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How much of the past to keep.
    #[arg(long = "keep", value_name = "DUR", default_value = "10m",
          value_parser = parse_positive_duration)]
    pub keep: Duration,
    /// The time buckets' length: a dump covers whole buckets.
    #[arg(long = "bucket", value_name = "DUR", default_value = "10s",
          value_parser = parse_positive_duration)]
    pub bucket: Duration,
    /// The most memory the buckets may hold (k, m, g); the oldest go first, counted.
    #[arg(long = "max-memory", value_name = "BYTES", default_value = "64m",
          value_parser = parse_memory)]
    pub max_memory: u64,
    /// On-CPU samples per second. 49 is prime, so it does not beat in step with timers
    /// (100 Hz, 1 kHz), and costs half of profile's 99.
    #[arg(short = 'F', long = "frequency", value_name = "HZ", default_value_t = 49,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub frequency: u64,
    /// Record on-CPU samples only, not off-CPU time.
    #[arg(long = "no-offcpu")]
    pub no_offcpu: bool,
    /// Where SIGUSR1 and the end of the recording write (any format, by extension).
    #[arg(short = 'o', long = "output", value_name = "PATH", value_parser = OutputSpec::parse)]
    pub outputs: Vec<OutputSpec>,
    /// The window SIGUSR1 and the end write: the last DUR (default: all that is kept).
    #[arg(long = "window", value_name = "DUR", value_parser = parse_positive_duration)]
    pub window: Option<Duration>,
    /// The unix socket `livetrace dump` talks to (mode 0600: its owner only).
    #[arg(long = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Write one pprof per interval into --dir (on-CPU, and off-CPU beside it).
    #[arg(long = "write-every", value_name = "DUR", value_parser = parse_positive_duration,
          requires = "dir")]
    pub write_every: Option<Duration>,
    #[arg(long = "dir", value_name = "DIR", requires = "write_every")]
    pub dir: Option<PathBuf>,
    /// The most files --write-every keeps of each kind; the oldest are removed.
    #[arg(long = "max-files", value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_files: u32,
    /// Capacity of the maps of stacks and of counts (per object); the stack map is emptied at
    /// a cut once it holds a sixteenth of this.
    #[arg(long = "stack-storage-size", value_name = "N",
          default_value_t = livetrace_common::stacks::DEFAULT_STACK_STORAGE,
          value_parser = clap::value_parser!(u32).range(64..=4_194_304))]
    pub stack_storage: u32,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(short = 'd', long = "duration", value_name = "SECS",
          value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub unwind: UnwindArgs,
}

fn parse_memory(text: &str) -> Result<u64, String> {
    match crate::unwind::parse_bytes(text)? {
        bytes if bytes >= 1 << 20 => Ok(bytes),
        _ => Err(format!("--max-memory {text} is too small: 1m at least")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = args.target.resolve()?;
    if args.bucket < MIN_BUCKET {
        return Err(crate::UsageError::error(format!(
            "--bucket {:?} is shorter than the recorder's tick: give 250ms or more",
            args.bucket
        )));
    }
    if args.bucket > args.keep {
        return Err(crate::UsageError::error(format!(
            "--bucket ({:?}) is longer than --keep ({:?})",
            args.bucket, args.keep
        )));
    }
    let (as_root, duration) = (args.target.processes.as_root, args.duration);
    let cpu = profile::Profile::new(profile::Args {
        target: args.target.clone(),
        frequency: args.frequency,
        duration: None,
        user_only: false,
        kernel_only: false,
        outputs: Vec::new(),
        per_thread: false,
        stack_storage: args.stack_storage,
        event: profile::Event::CpuClock,
        unwind: args.unwind.clone(),
    });
    let off = (!args.no_offcpu).then(|| {
        offcpu::Offcpu::new(offcpu::Args {
            target: args.target.clone(),
            duration: None,
            user_only: false,
            kernel_only: false,
            state: offcpu::State::Any,
            min_block: None,
            max_block: None,
            outputs: Vec::new(),
            per_thread: false,
            wakers: false,
            include_kernel_threads: false,
            stack_storage: args.stack_storage,
            attach: offcpu::Attach::Auto,
            unwind: args.unwind.clone(),
        })
    });
    session::run(
        Record {
            args,
            cpu,
            off,
            server: None,
        },
        target,
        as_root,
        duration,
    )
}

struct Record {
    args: Args,
    cpu: profile::Profile,
    off: Option<offcpu::Offcpu>,
    server: Option<Server>,
}

impl Tool for Record {
    type Running = Recording;
    const NAME: &'static str = "record";

    fn privileges(&self, target: &Target) -> Privileges {
        let mut privileges = self.cpu.privileges(target);
        if let Some(off) = &self.off {
            let more = off.privileges(target);
            privileges.needs.extend(more.needs);
            privileges.wanted.extend(more.wanted);
        }
        // Both tools need the same capabilities, once each (in the order first needed).
        for list in [&mut privileges.needs, &mut privileges.wanted] {
            let mut seen = Vec::new();
            list.retain(|need| {
                let new = !seen.contains(&(need.cap, need.why));
                seen.push((need.cap, need.why));
                new
            });
        }
        privileges
    }

    fn prepare(&mut self, target: &Target) -> anyhow::Result<Vec<OutputSpec>> {
        let _ = target;
        // Claimed before the kernel is touched: a second recorder on the same socket is an
        // error the user can act on, not a surprise after loading.
        self.server = Some(Server::bind(&self.args.socket)?);
        if let Some(dir) = &self.args.dir {
            std::fs::create_dir_all(dir)
                .map_err(|err| anyhow::anyhow!("cannot create --dir {}: {err}", dir.display()))?;
        }
        Ok(self.args.outputs.clone())
    }

    fn start(self, session: &mut Session) -> anyhow::Result<Recording> {
        let cpu = self.cpu.start(session)?;
        let off = match self.off {
            Some(off) => {
                let mut off = off.start(session)?;
                off.set_control(control::RUNNING)?;
                Some(off)
            }
            None => None,
        };
        let timeline = Timeline::start();
        let now = Instant::now();
        Ok(Recording {
            cpu,
            off,
            store: Store::new(self.args.keep, self.args.max_memory),
            server: self.server.expect("bound in prepare"),
            timeline,
            cut_at: now,
            next_cut: now + self.args.bucket,
            written_at: timeline.at(now),
            last_quality: Default::default(),
            args: self.args,
        })
    }
}

pub(crate) struct Recording {
    cpu: profile::Sampling,
    off: Option<offcpu::Tracing>,
    store: Store,
    server: Server,
    /// The clock buckets are placed on.
    timeline: Timeline,
    /// When the current bucket began.
    cut_at: Instant,
    /// When the current bucket is due to end.
    next_cut: Instant,
    /// When --write-every last wrote.
    written_at: SystemTime,
    /// The capture's counters at the last cut, by kind: a bucket's are the differences.
    last_quality: [crate::model::DataQuality; 2],
    args: Args,
}

impl Running for Recording {
    fn ebpf(&mut self) -> &mut Ebpf {
        self.cpu.ebpf()
    }

    fn start_line(&self, session: &Session) -> String {
        format!(
            "recording {} at {} Hz{}, keeping the last {} in {} buckets within {} MiB; \
             `livetrace dump --socket {}` writes any of it",
            session.title(),
            self.args.frequency,
            if self.off.is_some() {
                " and its off-CPU time"
            } else {
                ""
            },
            crate::duration::describe(self.args.keep),
            crate::duration::describe(self.args.bucket),
            self.args.max_memory >> 20,
            self.args.socket.display()
        )
    }

    fn command_released(&mut self, pid: u32, session: &mut Session) {
        self.cpu.command_released(pid, session);
        if let Some(off) = &mut self.off {
            off.command_released(pid, session);
        }
    }

    fn on_event(&mut self, event: Event, session: &mut Session) {
        match event {
            Event::FastTick => {
                self.cpu.on_event(event, session);
                if let Some(off) = &mut self.off {
                    off.on_event(event, session);
                }
                self.serve(session);
            }
            Event::Tick => {
                self.cpu.on_event(event, session);
                if let Some(off) = &mut self.off {
                    off.on_event(event, session);
                }
                // Cut on a fixed schedule, so that buckets do not drift by a tick each.
                let now = Instant::now();
                if now >= self.next_cut {
                    self.cut_or_say(session);
                    self.next_cut = (self.next_cut + self.args.bucket).max(now);
                }
                self.write_rotated();
            }
            Event::Snapshot => {
                self.cut_or_say(session);
                let to = self.timeline.now();
                let from = self.default_from(to);
                let outputs = self.args.outputs.clone();
                match self.write_window(from, to, &outputs) {
                    Ok(report) => crate::say_raw!("{report}"),
                    Err(err) => crate::say!("livetrace: SIGUSR1: {err:#}"),
                }
            }
        }
    }

    fn stopped(&mut self, session: &mut Session) -> anyhow::Result<()> {
        if let Some(off) = &mut self.off {
            off.set_control(control::STOPPED)?;
            off.stopped(session)?;
        }
        self.cpu.stopped(session)?;
        self.cut_or_say(session);
        // Dumps that asked while the recording stopped are answered, with all of it.
        self.serve(session);
        Ok(())
    }

    fn finish(
        mut self,
        _session: &mut Session,
        _stop: &StopReason,
        _elapsed: Duration,
    ) -> anyhow::Result<()> {
        if let Some(off) = &mut self.off {
            crate::bpf::unload_all(off.ebpf());
        }
        self.write_rotated_now(self.timeline.now());
        if self.args.outputs.is_empty() {
            self.server.close();
            self.serve_closing();
            return Ok(());
        }
        let to = self.timeline.now();
        let from = self.default_from(to);
        let outputs = self.args.outputs.clone();
        let result = self.write_window(from, to, &outputs);
        // No new dump can connect once the socket is gone; those already connected are answered.
        self.server.close();
        self.serve_closing();
        crate::say_raw!("{}", result?);
        Ok(())
    }
}

impl Recording {
    /// Ends the current bucket now and keeps it.
    fn cut(&mut self, session: &mut Session) -> anyhow::Result<()> {
        let started = self.cut_at;
        // The clock read once, before the take: the next bucket starts where this one ends.
        let now = Instant::now();
        let (start, end) = (self.timeline.at(started), self.timeline.at(now));
        let elapsed = now.duration_since(started);
        self.cut_at = now;
        // What is taken out of the kernel is kept even if the other half fails.
        let cpu = self.cpu.take_bucket(&mut session.symbolizer, elapsed);
        let off = self
            .off
            .as_mut()
            .map(|off| off.take_bucket(&mut session.symbolizer));
        let (mut cpu, mut off) = match (cpu, off.transpose()) {
            (Ok(cpu), Ok(off)) => (Some(cpu), off),
            (Ok(cpu), Err(err)) => {
                crate::say!("livetrace: record: the off-CPU part of a bucket is lost: {err:#}");
                (Some(cpu), None)
            }
            (Err(err), Ok(off)) => {
                crate::say!("livetrace: record: the on-CPU part of a bucket is lost: {err:#}");
                (None, off)
            }
            (Err(err), Err(_)) => return Err(err),
        };
        for (kind, profile) in [(Kind::OnCpu, cpu.as_mut()), (Kind::OffCpu, off.as_mut())] {
            if let Some(profile) = profile {
                self.in_bucket(kind, profile, start, elapsed);
            }
        }
        self.keep_maps_bounded([cpu.as_mut(), off.as_mut()]);
        self.store.add(start, end, [cpu, off]);
        // The processes that exited before the previous cut are named by now.
        session.symbolizer.forget_exited();
        Ok(())
    }

    /// Keeps the kernel's maps from filling over a long recording ([`stacks::keep_maps_bounded`]),
    /// noting in the bucket when a stack map was emptied.
    fn keep_maps_bounded(&mut self, parts: [Option<&mut StackProfile>; 2]) {
        let storage = self.args.stack_storage;
        let objects = [Some(self.cpu.ebpf()), self.off.as_mut().map(|o| o.ebpf())];
        for (ebpf, part) in objects.into_iter().zip(parts) {
            let (Some(ebpf), Some(part)) = (ebpf, part) else {
                continue;
            };
            match stacks::keep_maps_bounded(ebpf, storage) {
                Ok(false) => {}
                // One line for the window however often (the notes of buckets merge).
                Ok(true) => part.quality.notes.push(format!(
                    "the stack map filled a sixteenth and was emptied at a cut: samples of \
                     those instants may show [lost ... stack] (--stack-storage-size {storage})"
                )),
                Err(err) => crate::say!("livetrace: record: cannot empty the maps: {err:#}"),
            }
        }
    }

    fn cut_or_say(&mut self, session: &mut Session) {
        if let Err(err) = self.cut(session) {
            crate::say!("livetrace: record: cannot take the last bucket: {err:#}");
        }
    }

    /// Turns the capture's counters so far into the bucket's own, and the notes into its.
    fn in_bucket(
        &mut self,
        kind: Kind,
        profile: &mut StackProfile,
        start: SystemTime,
        elapsed: Duration,
    ) {
        let quality = &mut profile.quality;
        let total = quality.clone();
        let last = &self.last_quality[kind as usize];
        quality.events -= last.events.min(quality.events);
        quality.recorded -= last.recorded.min(quality.recorded);
        quality.idle -= last.idle.min(quality.idle);
        quality.not_target -= last.not_target.min(quality.not_target);
        quality.counts_map_full -= last.counts_map_full.min(quality.counts_map_full);
        quality.unwind_ring_full -= last.unwind_ring_full.min(quality.unwind_ring_full);
        quality.duration = elapsed;
        quality.started_unix_ns = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_nanos() as u64);
        quality.stop_reason = None;
        // The tools' notes that count the whole capture so far (switches seen, in-kernel cost)
        // or speak of a snapshot are not the bucket's.
        quality.notes.retain(|n| {
            ![
                "snapshot (SIGUSR1)",
                "context switches seen",
                "in-kernel cost",
            ]
            .iter()
            .any(|cumulative| n.contains(cumulative))
        });
        self.last_quality[kind as usize] = total;
    }

    /// The start of the window SIGUSR1 and the end write.
    fn default_from(&self, to: SystemTime) -> SystemTime {
        match self.args.window {
            Some(window) => to.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH),
            None => SystemTime::UNIX_EPOCH,
        }
    }

    /// Writes the window `from..to` to `outputs` (off-CPU beside each, see [`OutputSpec::beside`]) and
    /// says what was written, with each profile's footer.
    fn write_window(
        &self,
        from: SystemTime,
        to: SystemTime,
        outputs: &[OutputSpec],
    ) -> anyhow::Result<String> {
        let mut report = String::new();
        let mut failures = Vec::new();
        for kind in [Kind::OnCpu, Kind::OffCpu] {
            let Some((mut profile, start, end)) = self.store.window(kind, from, to) else {
                continue;
            };
            self.note_window(&mut profile, (from, to), (start, end));
            let outputs: Vec<OutputSpec> = match kind {
                Kind::OnCpu => outputs.to_vec(),
                Kind::OffCpu => outputs.iter().map(|o| o.beside("offcpu")).collect(),
            };
            let written = output::write_stack_profile(&profile, &outputs);
            report.push_str(&output::footer::text(&profile));
            for path in written.paths() {
                report.push_str(&format!("livetrace: wrote {path}\n"));
            }
            if let Err(err) = written.finish() {
                failures.push(format!("{err:#}"));
            }
        }
        if report.is_empty() {
            anyhow::bail!(
                "nothing recorded in that window yet: the first bucket ends {} after the start \
                 (--bucket), and a dump covers whole buckets",
                crate::duration::describe(self.args.bucket)
            );
        }
        match failures.is_empty() {
            true => Ok(report),
            false => Err(anyhow::anyhow!("{}", failures.join("\n"))),
        }
    }

    /// The window's own notes: what it covers, and what memory made the recorder forget.
    fn note_window(
        &self,
        profile: &mut StackProfile,
        (from, to): (SystemTime, SystemTime),
        (start, end): (SystemTime, SystemTime),
    ) {
        let notes = &mut profile.quality.notes;
        notes.extend(self.timeline.drift_note());
        notes.push(format!(
            "window {} to {}: the whole buckets ({}) within what was asked, {}",
            clock(start),
            clock(end),
            crate::duration::describe(self.args.bucket),
            if from == SystemTime::UNIX_EPOCH {
                format!("all that is kept (up to {})", clock(to))
            } else {
                format!("{} to {}", clock(from), clock(to))
            }
        ));
        if let Some(oldest) = self.store.oldest()
            && from > SystemTime::UNIX_EPOCH
            && from < oldest
            && self.store.evicted + self.store.expired > 0
        {
            notes.push(format!(
                "the window asked for starts before the oldest bucket kept ({})",
                clock(oldest)
            ));
        }
        if self.store.evicted > 0 {
            notes.push(format!(
                "{} buckets ({}) were dropped, oldest first, to stay within --max-memory {} MiB \
                 (held now: {:.1} MiB): raise --max-memory, or lower -F or --keep",
                self.store.evicted,
                crate::duration::describe(self.store.evicted_time),
                self.args.max_memory >> 20,
                self.store.bytes() as f64 / f64::from(1 << 20)
            ));
        }
    }

    /// Answers every `dump` whose request has arrived, after cutting a bucket so that the
    /// last seconds are in it.
    fn serve(&mut self, session: &mut Session) {
        let ready = self.server.poll();
        if ready.iter().any(|(_, request)| request.is_ok()) {
            self.cut_or_say(session);
        }
        for (mut client, request) in ready {
            client.reply(request.and_then(|request| self.answer(&request)));
        }
    }

    /// Answers the dumps that connected before the socket was removed, from what is kept.
    fn serve_closing(&mut self) {
        for (mut client, request) in self.server.last_requests() {
            client.reply(request.and_then(|request| self.answer(&request)));
        }
    }

    fn answer(&self, request: &Request) -> anyhow::Result<String> {
        let to = request.to.unwrap_or_else(|| self.timeline.now());
        let from = match (request.from, request.last) {
            (Some(from), _) => from,
            (None, Some(last)) => to.checked_sub(last).unwrap_or(SystemTime::UNIX_EPOCH),
            (None, None) => self.default_from(to),
        };
        self.write_window(from, to, &request.outputs)
    }

    fn write_rotated(&mut self) {
        let now = self.timeline.now();
        if let Some(every) = self.args.write_every
            && now.duration_since(self.written_at).unwrap_or_default() >= every
        {
            self.write_rotated_now(now);
        }
    }

    /// `--write-every`: the buckets since the last file, as one pprof of each kind, and the
    /// oldest files beyond --max-files removed.
    fn write_rotated_now(&mut self, now: SystemTime) {
        let Some(dir) = &self.args.dir else { return };
        // The buckets since the last file, whole: the next file starts where this one ends, so
        // the files tile the recording. An interval without a whole bucket writes nothing.
        let Some(end) = self.store.last_end_within(self.written_at, now) else {
            return;
        };
        // Named by the start of what it holds, to the millisecond: the windows tile, so the
        // names are unique and sort in time order.
        let name = format!("{ROTATED_PREFIX}{}.pb.gz", rotated_stamp(self.written_at));
        let spec = OutputSpec::parse(&dir.join(&name).to_string_lossy());
        let result = spec
            .map_err(anyhow::Error::msg)
            .and_then(|spec| self.write_window(self.written_at, end, std::slice::from_ref(&spec)));
        if let Err(err) = result {
            crate::say!("livetrace: --write-every: {err:#}");
        }
        self.written_at = end;
        socket::remove_oldest(dir, ROTATED_PREFIX, self.args.max_files as usize);
    }
}

/// `20261208-012600.250`: a UTC time to the millisecond, for --write-every's file names.
fn rotated_stamp(at: SystemTime) -> String {
    let millis = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    format!("{}.{millis:03}", crate::timestamp_of(at))
}

/// A wall-clock time as UTC `HH:MM:SS`.
fn clock(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
