//! Attaching the probes (and following `-- COMMAND`'s children), detaching them, and what they
//! cost in the kernel.

use std::{
    num::NonZeroU32,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{BtfTracePoint, UProbe, uprobe::UProbeScope},
};

use crate::{bpf, symbolize::Symbolizer};

use super::{
    sites::{Probed, Site},
    usdt::{self, Links},
};

use livetrace_common::{
    follow::FOLLOW_FORK,
    objects::uprobe_hist::{ENTRY, RETURN, SPAN_FROM, SPAN_TO, THREAD_EXIT},
};

/// Loads the programs and attaches them: the thread-exit tracepoint first, so no exit is missed,
/// then (for a command) the fork follower, then each site's return probe before its entry probe,
/// so that no entry is recorded whose return could not be seen (for spans, the `--to` probes
/// before the `--from` ones, whose links are returned).
pub(super) fn attach(
    ebpf: &mut Ebpf,
    probed: &Probed,
    command_pid: Option<u32>,
) -> anyhow::Result<Option<Links>> {
    let btf = crate::kernel_btf::aya_btf().context(
        "uprobe-hist needs the kernel's BTF to notice threads that exit inside the function",
    )?;
    bpf::attach_btf_tracepoint(ebpf, THREAD_EXIT, "sched_process_exit", &btf)?;
    if command_pid.is_some() {
        bpf::attach_btf_tracepoint(ebpf, FOLLOW_FORK, "sched_process_fork", &btf)?;
    }
    let sites = match probed {
        Probed::Function(sites) => sites,
        Probed::Spans(spans) => return usdt::attach(ebpf, spans).map(Some),
    };
    for name in [RETURN, ENTRY] {
        let program = uprobe(ebpf, name)?;
        program
            .load()
            .map_err(|e| bpf::program_error(e, &format!("load the {name} BPF program")))?;
    }
    for site in sites {
        // The command's own executable: every process running it, filtered to the command's
        // in the kernel (follow_fork adds its children there).
        let pid = match (site.pid, command_pid) {
            (None, Some(_)) if site.in_command_executable => None,
            (pid, command) => pid.or(command),
        };
        probe_site(ebpf, site, pid)?;
    }
    Ok(None)
}

/// The entry or return probe program of the object.
fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("the BPF object has no {name} program; rebuild livetrace"))?
        .try_into()?)
}

/// Attaches the return probe, then the entry probe, to `site` in process `pid` (or in every
/// process that runs its file).
fn probe_site(ebpf: &mut Ebpf, site: &Site, pid: Option<u32>) -> anyhow::Result<()> {
    let scope = match pid {
        Some(pid) => UProbeScope::OneProcess(
            NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0 cannot be probed"))?,
        ),
        None => UProbeScope::AllProcesses,
    };
    for name in [RETURN, ENTRY] {
        let program = uprobe(ebpf, name)?;
        program
            .attach(site.symbol.file_offset, &site.file.path, scope)
            .map_err(|e| {
                bpf::program_error(
                    e,
                    &format!(
                        "attach a {} to {} at file offset {:#x} in {}",
                        if name == ENTRY { "uprobe" } else { "uretprobe" },
                        site.symbol.demangled,
                        site.symbol.file_offset,
                        site.file.shown
                    ),
                )
            })?;
    }
    Ok(())
}

/// `-- COMMAND`'s child processes, probed as `follow_fork` announces them.
pub(super) struct Children {
    ring: RingBuf<MapData>,
    probed: Vec<u32>,
    /// Children that could not be probed, and why.
    failed: Vec<(u32, String)>,
    /// Children covered from birth by the probe on the command's executable.
    covered: usize,
}

impl Children {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            probed: Vec::new(),
            failed: Vec::new(),
            covered: 0,
        }
    }

    /// Probes the children announced since the last call (each within a tick of its fork),
    /// unless the probe on the command's executable already covers them.
    /// `site` None: the probes are on every process of their files (USDT spans), filtered in
    /// the kernel, so each child is covered from its birth.
    pub(super) fn probe_new(
        &mut self,
        ebpf: &mut Ebpf,
        site: Option<&Site>,
        symbolizer: &mut Symbolizer,
    ) {
        while let Some(item) = self.ring.next() {
            let Some(&[a, b, c, d]) = item.get(..4) else {
                continue;
            };
            let pid = u32::from_ne_bytes([a, b, c, d]);
            drop(item);
            symbolizer.note_process(pid);
            let Some(site) = site.filter(|s| !s.in_command_executable) else {
                self.covered += 1;
                continue;
            };
            match probe_site(ebpf, site, Some(pid)) {
                Ok(()) => self.probed.push(pid),
                Err(err) => self.failed.push((pid, format!("{err:#}"))),
            }
        }
    }

    pub(super) fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.probed.is_empty() {
            notes.push(format!(
                "followed {} child processes of the command; each was probed from when its \
                 fork was seen (within ~50 ms): calls in that first moment are not counted",
                self.probed.len()
            ));
        }
        if self.covered > 0 {
            notes.push(format!(
                "followed {} child processes of the command, each timed from its birth by the \
                 probes on the command's files",
                self.covered
            ));
        }
        // One line per reason, not per child: a forking command can have thousands.
        let mut by_reason: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
        for (pid, why) in &self.failed {
            by_reason.entry(why).or_default().push(*pid);
        }
        for (why, pids) in by_reason {
            let shown: Vec<String> = pids.iter().take(5).map(u32::to_string).collect();
            notes.push(format!(
                "{} child processes could not be probed (pid {}{}): {why}",
                pids.len(),
                shown.join(", "),
                if pids.len() > 5 { ", ..." } else { "" }
            ));
        }
        notes
    }
}

/// Stops new calls from being timed first, gives calls in flight a moment to return, then
/// detaches the rest; what is still open after that is counted from the thread map.
pub(super) fn detach(ebpf: &mut Ebpf, links: Option<Links>) -> anyhow::Result<()> {
    let names = match links {
        Some(links) => {
            links.close();
            [SPAN_FROM, SPAN_TO]
        }
        None => [ENTRY, RETURN],
    };
    for name in names {
        let program = uprobe(ebpf, name)?;
        program
            .unload()
            .with_context(|| format!("failed to detach the {name} probes"))?;
        if name == ENTRY {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let exit: &mut BtfTracePoint = ebpf
        .program_mut(THREAD_EXIT)
        .context("uprobe_hist_thread_exit vanished")?
        .try_into()?;
    exit.unload()
        .context("failed to detach the thread-exit tracepoint")?;
    Ok(())
}

/// The kernel's own accounting of the probes' run time (`kernel.bpf_stats_enabled=1`):
/// (run_time_ns, run_cnt) summed over the entry and return programs.
pub(super) fn probe_cost(ebpf: &Ebpf, spans: bool) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    let names = if spans {
        [SPAN_FROM, SPAN_TO]
    } else {
        [ENTRY, RETURN]
    };
    for name in names {
        let program: &UProbe = ebpf.program(name)?.try_into().ok()?;
        let fd = program.fd().ok()?.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        total.0 += field("run_time_ns:")?;
        total.1 += field("run_cnt:")?;
    }
    // Both zero: the statistics are off.
    (total.1 > 0 || total.0 > 0).then_some(total)
}
