//! `uprobe-hist --from usdt:... --to usdt:... [--by ARG]`: the time between two USDT probes on
//! the same thread (a database's query latency), and its breakdown by an argument of the first.
//!
//! Each site is attached through the kernel's uprobe PMU directly: aya cannot pass a probe's
//! semaphore (`ref_ctr_offset`), and a guarded probe whose semaphore nobody raises never fires,
//! the classic silent failure of USDT tracing. With it, the kernel raises the semaphore in every
//! process that maps the file, now or later, for as long as the probe is attached, and lowers it
//! on detach. Each `--from` site's link carries its index as the BPF cookie, so the program
//! reads the `--by` argument where that site keeps it.

use std::{
    collections::HashMap,
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{Ebpf, programs::UProbe};
use aya_obj::generated::{
    PERF_FLAG_FD_CLOEXEC, bpf_attach_type::BPF_PERF_EVENT, bpf_attr, bpf_cmd::BPF_LINK_CREATE,
    perf_event_attr,
};
use livetrace_common::{
    objects::uprobe_hist::{SPAN_FROM, SPAN_TO},
    usdt::{ARG_CONSTANT, ARG_INDEXED, ARG_MEMORY, ARG_REGISTER, ARG_UNREADABLE, ArgSpec},
};

use super::target::{Candidate, Scope, files_to_search, variable_named};
use crate::{
    UsageError, bpf,
    session::targets::Target,
    usdt::{self, ProbeSite, args},
};

/// `usdt:[TARGET:]PROVIDER:NAME`, as `--from` and `--to` take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtPoint {
    /// A path or library name; without it, the executable and its libraries are searched.
    pub target: Option<String>,
    pub provider: String,
    pub name: String,
}

impl UsdtPoint {
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "'{text}' is not a USDT probe: write usdt:[TARGET:]PROVIDER:NAME, e.g. \
                 usdt:postgresql:query__start (`livetrace probes TARGET` lists them)"
            )
        };
        let rest = text.strip_prefix("usdt:").ok_or_else(usage)?;
        let (before, name) = rest.rsplit_once(':').ok_or_else(usage)?;
        let (target, provider) = match before.rsplit_once(':') {
            Some((target, provider)) => (Some(target), provider),
            None => (None, before),
        };
        if provider.is_empty() || name.is_empty() || target.is_some_and(str::is_empty) {
            return Err(usage());
        }
        Ok(Self {
            target: target.map(str::to_owned),
            provider: provider.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn full_name(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }
}

/// `--by`: an argument of the `--from` probe, its value or the string it points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Integer(usize),
    String(usize),
}

impl By {
    pub fn parse(text: &str) -> Result<Self, String> {
        let index = |arg: &str| {
            arg.strip_prefix("arg")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < args::MAX_ARGS)
        };
        if let Some(inner) = text.strip_prefix("str(").and_then(|t| t.strip_suffix(')')) {
            if let Some(n) = index(inner) {
                return Ok(Self::String(n));
            }
        } else if let Some(n) = index(text) {
            return Ok(Self::Integer(n));
        }
        Err(format!(
            "'{text}' is no argument: write argN for its value or str(argN) for the string it \
             points to, N from 0 to {}, as bpftrace numbers them",
            args::MAX_ARGS - 1
        ))
    }

    pub fn index(self) -> usize {
        match self {
            Self::Integer(n) | Self::String(n) => n,
        }
    }
}

impl std::fmt::Display for By {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Integer(n) => write!(f, "arg{n}"),
            Self::String(n) => write!(f, "str(arg{n})"),
        }
    }
}

/// One probe's sites in one file.
#[derive(Clone, Debug)]
pub struct PointSites {
    pub file: Candidate,
    pub sites: Vec<ProbeSite>,
}

/// Where both probes are, for one process (or for every process that runs the file).
#[derive(Clone, Debug)]
pub struct SpanSites {
    pub pid: Option<u32>,
    pub from: PointSites,
    pub to: PointSites,
}

impl SpanSites {
    pub fn describe(&self, command_pid: Option<u32>) -> String {
        let file = if self.from.file.path == self.to.file.path {
            self.from.file.shown.clone()
        } else {
            format!("{} and {}", self.from.file.shown, self.to.file.shown)
        };
        match self.pid.or(command_pid) {
            Some(pid) => format!("{file} (pid {pid})"),
            None => format!("{file} (every process)"),
        }
    }
}

/// Finds both probes once per process (or once for the command or the whole system).
pub fn find_spans(
    from: &UsdtPoint,
    to: &UsdtPoint,
    target: &Target,
) -> anyhow::Result<Vec<SpanSites>> {
    // `--to` without TARGET is in `--from`'s file.
    let to = &UsdtPoint {
        target: to.target.clone().or_else(|| from.target.clone()),
        ..to.clone()
    };
    let mut files = ProbeFiles::default();
    let mut find = |scope: &Scope<'_>, pid| -> anyhow::Result<SpanSites> {
        Ok(SpanSites {
            pid,
            from: find_point(from, scope, &mut files)?,
            to: find_point(to, scope, &mut files)?,
        })
    };
    match target {
        Target::Threads { pids, .. } => pids
            .iter()
            .map(|&pid| find(&Scope::Pid(pid), Some(pid)))
            .collect(),
        Target::Command(argv) => Ok(vec![find(&Scope::Command(argv), None)?]),
        Target::System => Ok(vec![find(&Scope::System, None)?]),
    }
}

/// Each file's probes, read once however many probes and processes are looked for in it (the
/// files without probes, or unreadable, as None).
#[derive(Default)]
struct ProbeFiles(HashMap<PathBuf, Option<usdt::FileProbes>>);

impl ProbeFiles {
    fn get(&mut self, path: &Path) -> Option<&usdt::FileProbes> {
        self.0
            .entry(path.to_path_buf())
            .or_insert_with(|| usdt::probes_in(path).ok().and_then(Result::ok))
            .as_ref()
    }
}

/// The first file of the search that declares the probe.
fn find_point(
    point: &UsdtPoint,
    scope: &Scope<'_>,
    files: &mut ProbeFiles,
) -> anyhow::Result<PointSites> {
    let search = files_to_search(scope, point.target.as_deref())?;
    let mut others: Vec<String> = Vec::new();
    let mut searched = Vec::new();
    for file in &search.files {
        let Some(found) = files.get(&file.path) else {
            continue;
        };
        searched.push(file.shown.clone());
        if let Some(probe) = found
            .probes
            .iter()
            .find(|p| p.provider == point.provider && p.name == point.name)
        {
            return Ok(PointSites {
                file: file.clone(),
                sites: probe.sites.clone(),
            });
        }
        others.extend(found.probes.iter().map(usdt::Probe::full_name));
    }
    let files = search
        .files
        .iter()
        .map(|f| f.shown.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if searched.is_empty() {
        return Err(UsageError::error(format!(
            "no USDT probes in {}: {} declares none (no .note.stapsdt section); name the \
             binary or library that does, e.g. usdt:/path/to/binary:{}",
            if files.is_empty() {
                "the files searched"
            } else {
                &files
            },
            if search.files.len() == 1 {
                "it"
            } else {
                "none of them"
            },
            point.full_name()
        )));
    }
    let same_provider: Vec<&String> = others
        .iter()
        .filter(|o| o.starts_with(&format!("{}:", point.provider)))
        .collect();
    let listed = if same_provider.is_empty() {
        others.iter().collect()
    } else {
        same_provider
    };
    let shown: Vec<&str> = listed.iter().take(12).map(|s| s.as_str()).collect();
    Err(UsageError::error(format!(
        "no USDT probe {} in {}; it has {}{}",
        point.full_name(),
        searched.join(", "),
        shown.join(", "),
        if listed.len() > shown.len() {
            format!(
                " and {} more (`livetrace probes` lists them)",
                listed.len() - shown.len()
            )
        } else {
            String::new()
        }
    )))
}

/// The `--by` argument at each `--from` site, in the order the sites are attached (the index is
/// the site's cookie). With no `--by`, one unused spec.
pub fn arg_specs(
    spans: &[SpanSites],
    by: Option<By>,
) -> anyhow::Result<(Vec<ArgSpec>, Vec<String>)> {
    let Some(by) = by else {
        return Ok((vec![ArgSpec::default()], Vec::new()));
    };
    let mut specs = Vec::new();
    let mut notes = Vec::new();
    for span in spans {
        for site in &span.from.sites {
            let parsed = args::parse(&site.args).map_err(|why| {
                anyhow::anyhow!(
                    "the arguments of {}:{} at {:#x} in {} cannot be read: {why}",
                    site.provider,
                    site.name,
                    site.address,
                    span.from.file.shown
                )
            })?;
            let Some(arg) = parsed.get(by.index()) else {
                let listed: Vec<String> = parsed
                    .iter()
                    .enumerate()
                    .map(|(i, a)| format!("arg{i} ({a})"))
                    .collect();
                return Err(UsageError::error(format!(
                    "--by {by}: {}:{} has {} argument{}{}",
                    site.provider,
                    site.name,
                    parsed.len(),
                    if parsed.len() == 1 { "" } else { "s" },
                    if listed.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", listed.join(", "))
                    }
                )));
            };
            if arg.float {
                return Err(UsageError::error(format!(
                    "--by {by}: arg{} of {}:{} is a floating-point value ({arg}); --by keys on \
                     integers and strings",
                    by.index(),
                    site.provider,
                    site.name
                )));
            }
            if matches!(by, By::String(_)) && arg.size != 8 {
                return Err(UsageError::error(format!(
                    "--by {by}: arg{} of {}:{} is {arg}, too narrow for a pointer to a string: \
                     use --by arg{} for its value",
                    by.index(),
                    site.provider,
                    site.name,
                    by.index()
                )));
            }
            let (spec, note) = arg_spec(arg, site, &span.from.file.path);
            specs.push(spec);
            notes.extend(note);
        }
    }
    Ok((specs, notes))
}

/// One argument as the BPF program reads it.
fn arg_spec(arg: &args::Arg, site: &ProbeSite, file: &Path) -> (ArgSpec, Option<String>) {
    let mut spec = ArgSpec {
        size: arg.size,
        signed: u8::from(arg.signed),
        ..ArgSpec::default()
    };
    match &arg.operand {
        args::Operand::Constant(value) => {
            spec.kind = ARG_CONSTANT;
            spec.displacement = *value;
        }
        args::Operand::Register(register) => {
            spec.kind = ARG_REGISTER;
            spec.register = register.pt_regs_offset;
        }
        args::Operand::Memory {
            base,
            index,
            displacement,
        } => {
            spec.register = base.pt_regs_offset;
            spec.displacement = *displacement;
            match index {
                Some((index, scale)) => {
                    spec.kind = ARG_INDEXED;
                    spec.index_register = index.pt_regs_offset;
                    spec.scale_shift = scale.trailing_zeros() as u8;
                }
                None => spec.kind = ARG_MEMORY,
            }
        }
        args::Operand::Global { symbol, offset } => match variable_named(file, symbol) {
            // At the hit, rip is the site's own address in that process: the global is as far
            // from it as in the file.
            Some(address) => {
                spec.kind = ARG_MEMORY;
                spec.register = args::Register::RIP.pt_regs_offset;
                spec.displacement = (address as i64)
                    .wrapping_add(*offset)
                    .wrapping_sub(site.address as i64);
            }
            None => {
                spec.kind = ARG_UNREADABLE;
                return (
                    spec,
                    Some(format!(
                        "the argument at {:#x} is the global {symbol}, which the file's symbol \
                         tables do not name (stripped?): its spans are keyed 'unreadable'",
                        site.address
                    )),
                );
            }
        },
    }
    (spec, None)
}

/// The links of every probe site, `--from` and `--to` apart so they can be closed in order.
#[derive(Default)]
pub struct Links {
    from: Vec<OwnedFd>,
    to: Vec<OwnedFd>,
    /// Sites with a semaphore the kernel raises while attached.
    pub guarded: usize,
}

impl Links {
    /// Detaches the `--from` probes first, so that no span opens whose end cannot be seen; then,
    /// a moment later, the `--to` probes. The semaphores go down with them.
    pub fn close(self) {
        drop(self.from);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(self.to);
    }
}

/// Loads both span programs and attaches every site: the `--to` sites first, for the same
/// reason as [`Links::close`].
pub fn attach(ebpf: &mut Ebpf, spans: &[SpanSites]) -> anyhow::Result<Links> {
    let uprobe_type = uprobe_pmu_type()?;
    let mut links = Links::default();
    let guarded = spans
        .iter()
        .flat_map(|s| s.from.sites.iter().chain(&s.to.sites))
        .filter(|s| s.semaphore.is_some())
        .count();
    if guarded > 0
        && !Path::new("/sys/bus/event_source/devices/uprobe/format/ref_ctr_offset").exists()
    {
        bail!(
            "{guarded} of the probe sites are guarded by a semaphore, and this kernel cannot raise \
             it for a uprobe (that needs Linux 4.20 or later): those probes would never fire"
        );
    }
    links.guarded = guarded;
    for (name, is_from) in [(SPAN_TO, false), (SPAN_FROM, true)] {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("the BPF object has no {name} program; rebuild livetrace"))?
            .try_into()?;
        program
            .load()
            .map_err(|e| bpf::program_error(e, &format!("load the {name} BPF program")))?;
        let prog_fd = program.fd()?.as_fd().as_raw_fd();
        let mut cookie = 0u64;
        for span in spans {
            // A command's processes: every process of the file, kept to the command's in the
            // kernel (follow_fork adds its children there).
            let pid = span.pid;
            let point = if is_from { &span.from } else { &span.to };
            for site in &point.sites {
                let link = link(prog_fd, uprobe_type, &point.file.path, site, pid, cookie)
                    .with_context(|| {
                        format!(
                            "failed to attach {}:{} at {:#x} in {}",
                            site.provider, site.name, site.address, point.file.shown
                        )
                    })?;
                if is_from {
                    links.from.push(link);
                    cookie += 1;
                } else {
                    links.to.push(link);
                }
            }
        }
    }
    Ok(links)
}

/// Probe hits per second per CPU above which the traps themselves slow the target noticeably.
const HIGH_RATE: f64 = 1000.0;

/// A warning for probes that fire thousands of times a second per CPU: every hit is a trap
/// into the kernel (a few microseconds each).
pub fn rate_warning(hits: u64, elapsed: std::time::Duration) -> Option<String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per_cpu = hits as f64 / elapsed.as_secs_f64().max(1e-3) / cpus;
    (per_cpu > HIGH_RATE).then(|| {
        format!(
            "warning: the probes fired {per_cpu:.0} times a second per CPU; every hit is a trap \
             into the kernel (microseconds each), so the target ran slower while traced: \
             prefer probes that fire less often"
        )
    })
}

/// The uprobe PMU's type, from sysfs.
fn uprobe_pmu_type() -> anyhow::Result<u32> {
    let path = "/sys/bus/event_source/devices/uprobe/type";
    std::fs::read_to_string(path)
        .with_context(|| {
            format!("cannot read {path}: this kernel has no uprobe PMU (needs 4.17+)")
        })?
        .trim()
        .parse()
        .with_context(|| format!("{path} does not hold a number"))
}

/// One site: a uprobe perf event (with the semaphore's file offset, if any) and a BPF link to
/// the program carrying `cookie`.
fn link(
    prog_fd: i32,
    uprobe_type: u32,
    file: &Path,
    site: &ProbeSite,
    pid: Option<u32>,
    cookie: u64,
) -> anyhow::Result<OwnedFd> {
    let path = CString::new(file.as_os_str().as_bytes()).context("a path with a NUL byte")?;
    // SAFETY: perf_event_attr is plain data; zero is its documented default.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.size = std::mem::size_of::<perf_event_attr>() as u32;
    attr.type_ = uprobe_type;
    // The uprobe PMU's format: the semaphore's file offset in config's high 32 bits.
    let semaphore = site.semaphore.map_or(0, |s| s.file_offset);
    if semaphore > u64::from(u32::MAX) {
        bail!("the semaphore's file offset {semaphore:#x} does not fit the kernel's 32 bits");
    }
    attr.config = semaphore << 32;
    attr.__bindgen_anon_3.config1 = path.as_ptr() as u64;
    attr.__bindgen_anon_4.config2 = site.file_offset;
    let (pid, cpu) = match pid {
        Some(pid) => (pid as libc::c_int, -1),
        None => (-1, 0),
    };
    // SAFETY: the attribute and the path outlive the call; the result is checked.
    let perf_fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            pid,
            cpu,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if perf_fd < 0 {
        return Err(std::io::Error::last_os_error()).context("perf_event_open (uprobe)");
    }
    // SAFETY: a file descriptor the kernel just returned, owned by nothing else.
    let perf_fd = unsafe { OwnedFd::from_raw_fd(perf_fd as i32) };
    // SAFETY: bpf_attr is plain data; zero is its documented default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_create.__bindgen_anon_1.prog_fd = prog_fd as u32;
    attr.link_create.__bindgen_anon_2.target_fd = perf_fd.as_raw_fd() as u32;
    attr.link_create.attach_type = BPF_PERF_EVENT as u32;
    attr.link_create.__bindgen_anon_3.perf_event.bpf_cookie = cookie;
    // SAFETY: the attribute is valid for the call; the result is checked.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE as libc::c_int,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>() as u32,
        )
    };
    if link < 0 {
        return Err(std::io::Error::last_os_error())
            .context("BPF_LINK_CREATE (a perf link with a cookie needs Linux 5.15 or later)");
    }
    // The link holds the perf event: closing the link detaches it and lowers the semaphore.
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(link as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_arguments() {
        assert_eq!(
            UsdtPoint::parse("usdt:postgresql:query__start").unwrap(),
            UsdtPoint {
                target: None,
                provider: "postgresql".into(),
                name: "query__start".into()
            }
        );
        let point =
            UsdtPoint::parse("usdt:/usr/lib/postgresql/15/bin/postgres:postgresql:query__done")
                .unwrap();
        assert_eq!(
            point.target.as_deref(),
            Some("/usr/lib/postgresql/15/bin/postgres")
        );
        assert_eq!(point.full_name(), "postgresql:query__done");
        for bad in [
            "postgresql:query__start",
            "usdt:query__start",
            "usdt::x",
            "usdt:p:",
        ] {
            assert!(UsdtPoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(By::parse("arg2"), Ok(By::Integer(2)));
        assert_eq!(By::parse("str(arg0)"), Ok(By::String(0)));
        for bad in ["arg12", "str(arg)", "x", "str(arg0"] {
            assert!(By::parse(bad).is_err(), "{bad}");
        }
    }

    /// Thousands of hits a second per CPU get a warning with the rate; a query rate does not.
    #[test]
    fn warns_of_high_probe_rates() {
        let second = std::time::Duration::from_secs(1);
        let warning = rate_warning(50_000_000, second).expect("a warning");
        assert!(warning.contains("times a second per CPU"), "{warning}");
        assert_eq!(rate_warning(500, second), None);
    }
}
