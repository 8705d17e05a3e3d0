//! Loading livetrace's embedded BPF object, with settings passed as load-time globals and map
//! sizes fixed before the maps are created; and reading its counters back.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use livetrace_common::{
    offcpu::{self, MAX_THREADS},
    stacks::{self, COUNTER_SLOTS, Counter},
    unwind,
};

/// The BPF object that `build.rs` compiled from `livetrace-ebpf`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/livetrace"));

/// Settings of the stack-sampling programs (profile, offcpu).
#[derive(Clone)]
pub struct StackSettings {
    /// Sample only the threads of [`Self::tgids`] / [`Self::tids`].
    pub filter: bool,
    pub tgids: Vec<u32>,
    pub tids: Vec<u32>,
    /// `STACK_KIND_USER | STACK_KIND_KERNEL` bits.
    pub stack_kinds: u8,
    pub per_thread: bool,
    /// Capacity of the stack-trace and counts maps.
    pub stack_storage: u32,
    /// Settings of the offcpu programs; `None` keeps their maps at one entry.
    pub offcpu: Option<OffcpuSettings>,
    /// `--unwind dwarf` (profile only): bytes of user stack copied per sample; 0 = frame
    /// pointers, walked in the kernel.
    pub stack_copy_bytes: u32,
    /// Size of the ring buffer that carries stack copies to user space (a power of two).
    pub unwind_buffer: u32,
    /// The pid of a command started held (`-- COMMAND`): recorded only from its exec on (see
    /// [`follow_exec`]).
    pub held_command: Option<u32>,
    /// `task_struct.tgid`'s offset, for `follow_fork` to make targets of a target's children
    /// (profile's command mode; offcpu passes it with its own settings).
    pub fork_tgid_offset: Option<u32>,
}

/// The smallest ring buffer the kernel accepts: one page. Tools that do not copy stacks
/// shrink the unwind ring buffer to it.
const MIN_RING_BUFFER: u32 = 4096;

/// Settings of the offcpu programs (see `livetrace_common::offcpu`).
#[derive(Clone, Debug, Default)]
pub struct OffcpuSettings {
    pub task_pid_offset: u32,
    pub task_tgid_offset: u32,
    pub task_flags_offset: u32,
    pub tp_prev_state_offset: u32,
    pub tp_next_pid_offset: u32,
    pub state_mask: u32,
    pub min_block_ns: u64,
    pub max_block_ns: u64,
    pub include_kernel_threads: bool,
    pub wakers: bool,
}

/// Loads the object for a stack tool: every map is created and the settings are frozen into
/// `.rodata`; programs are loaded by the tool itself.
pub fn load_stacks(settings: &StackSettings) -> anyhow::Result<Ebpf> {
    let filter = u8::from(settings.filter);
    let per_thread = u8::from(settings.per_thread);
    let held_command = settings.held_command.unwrap_or(0);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(stacks::FILTER_TARGETS, &filter, true)
        .override_global(stacks::STACK_KINDS, &settings.stack_kinds, true)
        .override_global(stacks::PER_THREAD, &per_thread, true)
        .override_global(stacks::HELD_COMMAND, &held_command, true)
        .map_max_entries(stacks::STACK_COUNTS, settings.stack_storage)
        .map_max_entries(stacks::STACK_TRACES, settings.stack_storage)
        .override_global(unwind::STACK_COPY_BYTES, &settings.stack_copy_bytes, true)
        .map_max_entries(
            unwind::UNWIND_SAMPLES,
            if settings.stack_copy_bytes == 0 {
                MIN_RING_BUFFER
            } else {
                settings.unwind_buffer
            },
        );
    let mut off = settings.offcpu.clone().unwrap_or_default();
    if let Some(offset) = settings.fork_tgid_offset {
        off.task_tgid_offset = offset;
    }
    let (include_kthreads, wakers) = (u8::from(off.include_kernel_threads), u8::from(off.wakers));
    // Hash maps are preallocated: size the ones a tool does not use down to one entry.
    let (start_size, wakers_size, wake_counts_size) = match &settings.offcpu {
        None => (1, 1, 1),
        Some(o) if o.wakers => (MAX_THREADS, MAX_THREADS, settings.stack_storage),
        Some(_) => (MAX_THREADS, 1, 1),
    };
    loader
        .override_global(offcpu::TASK_PID_OFFSET, &off.task_pid_offset, true)
        .override_global(offcpu::TASK_TGID_OFFSET, &off.task_tgid_offset, true)
        .override_global(offcpu::TASK_FLAGS_OFFSET, &off.task_flags_offset, true)
        .override_global(
            offcpu::TP_PREV_STATE_OFFSET,
            &off.tp_prev_state_offset,
            true,
        )
        .override_global(offcpu::TP_NEXT_PID_OFFSET, &off.tp_next_pid_offset, true)
        .override_global(offcpu::STATE_MASK, &off.state_mask, true)
        .override_global(offcpu::MIN_BLOCK_NS, &off.min_block_ns, true)
        .override_global(offcpu::MAX_BLOCK_NS, &off.max_block_ns, true)
        .override_global(offcpu::INCLUDE_KERNEL_THREADS, &include_kthreads, true)
        .override_global(offcpu::RECORD_WAKERS, &wakers, true)
        .map_max_entries(
            unwind::COPY_LIMITS,
            if settings.stack_copy_bytes != 0 {
                MAX_THREADS
            } else {
                1
            },
        )
        .map_max_entries(offcpu::OFFCPU_START, start_size)
        .map_max_entries(offcpu::WAKERS, wakers_size)
        .map_max_entries(offcpu::WAKE_COUNTS, wake_counts_size);
    let mut bpf = loader.load(BPF_OBJECT).map_err(explain_load_error)?;
    for (map_name, ids) in [
        (stacks::TARGET_TGIDS, &settings.tgids),
        (stacks::TARGET_TIDS, &settings.tids),
    ] {
        let mut map: HashMap<_, u32, u8> = HashMap::try_from(map_mut(&mut bpf, map_name)?)?;
        for id in ids {
            map.insert(id, 1, 0)
                .with_context(|| format!("failed to add {id} to the BPF map {map_name}"))?;
        }
    }
    Ok(bpf)
}

/// Loads the `tp_btf` program `name` for the kernel tracepoint `tracepoint` and attaches it,
/// with errors that say which.
pub fn attach_btf_tracepoint(
    bpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> anyhow::Result<()> {
    let program: &mut aya::programs::BtfTracePoint = bpf
        .program_mut(name)
        .with_context(|| format!("the BPF object has no {name} program; rebuild livetrace"))?
        .try_into()?;
    program
        .load(tracepoint, btf)
        .map_err(|e| explain_program_error(e, &format!("load tp_btf/{tracepoint}")))?;
    program
        .attach()
        .map_err(|e| explain_program_error(e, &format!("attach tp_btf/{tracepoint}")))?;
    Ok(())
}

/// A test hook: with `LIVETRACE_TEST_REFUSE_STACK_COPIES=1`, programs that copy stacks are
/// refused as a kernel's verifier would refuse them, so that the fallback to frame pointers is
/// exercised on kernels that accept them.
pub fn refuse_stack_copies_for_test(settings: &StackSettings) -> anyhow::Result<()> {
    if settings.stack_copy_bytes != 0
        && std::env::var_os("LIVETRACE_TEST_REFUSE_STACK_COPIES").is_some()
    {
        anyhow::bail!(
            "the kernel's verifier rejected it (refused by LIVETRACE_TEST_REFUSE_STACK_COPIES)"
        );
    }
    Ok(())
}

/// Attaches the exec watcher (`sched_process_exec`, tp_btf): a held command is recorded from its
/// exec on, and the unwinding thread learns of every target's exec in order with its stacks.
/// Where it cannot be attached (no BTF), a held command is recorded from now on instead, as if
/// it had exec'd already, and the unwinding thread finds a new memory map by itself, later; the
/// returned note says so.
pub fn follow_exec(bpf: &mut Ebpf, btf: Option<&aya::Btf>) -> anyhow::Result<Option<String>> {
    let attached = match btf {
        Some(btf) => attach_btf_tracepoint(bpf, stacks::FOLLOW_EXEC, "sched_process_exec", btf),
        None => crate::kernel_btf::aya_btf().and_then(|btf| {
            attach_btf_tracepoint(bpf, stacks::FOLLOW_EXEC, "sched_process_exec", &btf)
        }),
    };
    let Err(err) = attached else {
        return Ok(None);
    };
    let mut started: Array<_, u32> = Array::try_from(map_mut(bpf, stacks::HELD_COMMAND_STARTED)?)?;
    started
        .set(0, 1, 0)
        .context("failed to mark the command as started")?;
    Ok(Some(format!(
        "execs are not followed ({err:#}): the command is recorded from before its exec, and a \
         process that execs may have stacks cut short for half a second after"
    )))
}

/// livetrace's own cost in the kernel, as the kernel counts it (only while
/// `kernel.bpf_stats_enabled=1`, which livetrace does not switch on by itself: it slows every BPF
/// program on the machine a little). Read before the programs are unloaded.
pub fn in_kernel_cost(bpf: &Ebpf) -> String {
    let (mut time, mut runs) = (std::time::Duration::ZERO, 0u64);
    for (_, program) in bpf.programs() {
        if let Ok(info) = program.info() {
            time += info.run_time();
            runs += info.run_count();
        }
    }
    if runs == 0 {
        return "in-kernel cost: not measured (`sysctl kernel.bpf_stats_enabled=1` makes the \
                kernel count it)"
            .into();
    }
    format!(
        "in-kernel cost: {:.0} ns per program run, {runs} runs, {:.3} s of CPU in total",
        time.as_nanos() as f64 / runs as f64,
        time.as_secs_f64()
    )
}

/// Tells the programs the capture is over; they stop recording at once, before the (possibly
/// slow: tracepoint detach waits for an RCU grace period) detach.
pub fn stop_capture(bpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut control: Array<_, u32> = Array::try_from(map_mut(bpf, stacks::CONTROL)?)?;
    control
        .set(0, stacks::CAPTURE_STOPPED, 0)
        .context("failed to tell the BPF programs to stop")
}

pub fn map_mut<'a>(bpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    bpf.map_mut(name)
        .ok_or_else(|| anyhow!("the BPF object has no map named {name}; rebuild livetrace"))
}

pub fn map_ref<'a>(bpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a aya::maps::Map> {
    bpf.map(name)
        .ok_or_else(|| anyhow!("the BPF object has no map named {name}; rebuild livetrace"))
}

/// The per-CPU counters, summed, read in place (the capture may still be running).
pub fn read_counters_in(bpf: &Ebpf) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
    read_counters(&PerCpuArray::try_from(map_ref(bpf, stacks::COUNTERS)?)?)
}

pub fn take_map(bpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    bpf.take_map(name)
        .ok_or_else(|| anyhow!("the BPF object has no map named {name}; rebuild livetrace"))
}

/// Sums the per-CPU counters.
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> anyhow::Result<[u64; COUNTER_SLOTS as usize]> {
    let mut totals = [0u64; COUNTER_SLOTS as usize];
    for (slot, total) in totals.iter_mut().enumerate() {
        let values = map
            .get(&(slot as u32), 0)
            .context("failed to read the BPF counters")?;
        *total = values.iter().sum();
    }
    Ok(totals)
}

/// One counter's value on each CPU (indexed by CPU number), read in place.
pub fn per_cpu_counter(bpf: &Ebpf, counter: Counter) -> anyhow::Result<Vec<u64>> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map_ref(bpf, stacks::COUNTERS)?)?;
    let values = map
        .get(&(counter as u32), 0)
        .context("failed to read the BPF counters")?;
    Ok(values.iter().copied().collect())
}

pub fn counter(totals: &[u64; COUNTER_SLOTS as usize], counter: Counter) -> u64 {
    totals[counter as usize]
}

/// Turns a load failure into a message that says what to do. Verifier logs are kept whole.
fn explain_load_error(err: EbpfError) -> anyhow::Error {
    let text = err.to_string();
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        "; loading BPF programs needs root, or the capabilities CAP_BPF and CAP_PERFMON \
         (try: sudo livetrace ..., and see `livetrace --help` for each subcommand's capabilities)"
    } else {
        ""
    };
    anyhow!(err).context(format!("failed to load livetrace's BPF programs{hint}"))
}

/// Adds the permission hint to an attach or load error of one program; a verifier rejection is
/// summarised (the lines that say why) and its whole log saved to a file whose path is given.
pub fn explain_program_error(err: aya::programs::ProgramError, what: &str) -> anyhow::Error {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
    {
        let log = verifier_log.to_string();
        if !log.trim().is_empty() {
            return anyhow!(verifier_rejection(
                what,
                io_error,
                &log,
                &program_name(what)
            ));
        }
    }
    let text = format!("{err}");
    let hint = if text.contains("Operation not permitted") || text.contains("os error 1)") {
        " (needs root, or CAP_BPF and CAP_PERFMON)"
    } else if text.contains("Permission denied") && what.contains("uprobe") {
        " (uprobes need root, or CAP_SYS_ADMIN besides CAP_BPF and CAP_PERFMON)"
    } else {
        ""
    };
    anyhow!(err).context(format!("failed to {what}{hint}"))
}

/// A file-name-friendly name for the program an action is about ("load tp_btf/sched_switch"
/// gives "tp_btf-sched_switch").
fn program_name(what: &str) -> String {
    let word = what
        .split_whitespace()
        .find(|w| w.contains('/') || w.contains('_'))
        .unwrap_or("program");
    word.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// How many lines of a verifier log the error message quotes.
const VERIFIER_SUMMARY_LINES: usize = 4;

/// The message for a program the verifier rejected: the reason, the last lines of the log that
/// lead to it, and where the whole log was saved.
fn verifier_rejection(what: &str, io_error: &std::io::Error, log: &str, program: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "livetrace-verifier-{program}-{}.log",
        std::process::id()
    ));
    let saved = crate::output::write_atomically(&path, |out| out.write_all(log.as_bytes()));
    let mut message = format!(
        "failed to {what}: the kernel's verifier rejected it ({io_error}). The verifier says:"
    );
    for line in summarize_verifier_log(log, VERIFIER_SUMMARY_LINES) {
        message.push_str("\n  ");
        message.push_str(&line);
    }
    match saved {
        Ok(()) => message.push_str(&format!(
            "\nthe whole verifier log is in {}",
            path.display()
        )),
        Err(err) => message.push_str(&format!("\n(the whole log could not be saved: {err:#})")),
    }
    message.push_str(
        "\nthis is a bug in livetrace or an incompatibility with this kernel: please report it \
         with the log and `uname -r`",
    );
    message
}

/// The last `max` lines of a verifier log that say why it refused the program: the statistics
/// it prints after the verdict (instructions processed, time, stack depth) are left out, since
/// the reason is the last line before them and the instructions just above lead to it.
pub fn summarize_verifier_log(log: &str, max: usize) -> Vec<String> {
    const STATISTICS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut end = lines.len();
    while end > 0
        && STATISTICS
            .iter()
            .any(|s| lines[end - 1].trim_start().starts_with(s))
    {
        end -= 1;
    }
    if end == 0 {
        // Nothing but statistics: quote them rather than nothing.
        end = lines.len();
    }
    let start = end.saturating_sub(max);
    lines[start..end]
        .iter()
        .map(|l| {
            // Instruction lines carry the register state after a `;` column: keep it short.
            let l = l.split("   ; ").next().unwrap_or(l).trim_end();
            let mut shown: String = l.chars().take(160).collect();
            if shown.len() < l.len() {
                shown.push_str("...");
            }
            shown
        })
        .collect()
}

/// Settings of `uprobe-hist`'s programs.
pub struct UprobeHistSettings {
    /// Calls at least this long (ns) go to the slow-call ring buffer; 0 = off.
    pub slow_ns: u64,
    /// Threads that can be inside the function at once.
    pub max_threads: u32,
    /// Distinct caller stacks of slow calls.
    pub stack_storage: u32,
    /// Slow-call ring buffer size in bytes (a power of two, at least a page).
    pub slow_buffer: u32,
    /// `-- COMMAND`: its pid, whose forks are followed and announced (`follow_fork`), and
    /// `task_struct.tgid`'s offset, which that program reads.
    pub follow: Option<(u32, u32)>,
}

/// Loads the object for `uprobe-hist`, its maps sized for it and the stack tools' maps shrunk
/// to nothing (they are created with the object but unused here).
pub fn load_uprobe_hist(settings: &UprobeHistSettings) -> anyhow::Result<Ebpf> {
    use livetrace_common::uprobe_hist;
    let (filter, tgid_offset) = settings.follow.map_or((0u8, 0), |(_, offset)| (1, offset));
    let mut bpf = EbpfLoader::new()
        .override_global(uprobe_hist::SLOW_NS, &settings.slow_ns, true)
        .override_global(stacks::FILTER_TARGETS, &filter, true)
        .override_global(offcpu::TASK_TGID_OFFSET, &tgid_offset, true)
        .map_max_entries(uprobe_hist::THREADS, settings.max_threads)
        .map_max_entries(uprobe_hist::STACKS, settings.stack_storage)
        .map_max_entries(uprobe_hist::SLOW_CALLS, settings.slow_buffer)
        .map_max_entries(stacks::STACK_COUNTS, 1)
        .map_max_entries(stacks::STACK_TRACES, 1)
        .map_max_entries(unwind::UNWIND_SAMPLES, MIN_RING_BUFFER)
        .map_max_entries(
            stacks::SEEN_PROCESSES,
            if settings.follow.is_some() {
                stacks::MAX_TARGETS
            } else {
                1
            },
        )
        .map_max_entries(offcpu::OFFCPU_START, 1)
        .map_max_entries(offcpu::WAKERS, 1)
        .map_max_entries(offcpu::WAKE_COUNTS, 1)
        .load(BPF_OBJECT)
        .map_err(explain_load_error)?;
    if let Some((pid, _)) = settings.follow {
        let mut targets: HashMap<_, u32, u8> =
            HashMap::try_from(map_mut(&mut bpf, stacks::TARGET_TGIDS)?)?;
        targets
            .insert(pid, 1, 0)
            .with_context(|| format!("failed to add {pid} to the BPF map of targets"))?;
    }
    Ok(bpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real verifier log (this kernel, a map value dereferenced without its null check): the
    /// summary ends with the reason, quotes the instruction that caused it, and leaves out the
    /// statistics after the verdict.
    #[test]
    fn summarises_a_real_verifier_log() {
        let log = include_str!("../tests/data/verifier-null-map-value.log");
        let summary = summarize_verifier_log(log, 4);
        assert_eq!(summary.len(), 4, "{summary:#?}");
        assert_eq!(
            summary.last().unwrap(),
            "R0 invalid mem access 'map_value_or_null'"
        );
        assert_eq!(summary[2], "7: (79) r0 = *(u64 *)(r0 +0)");
        assert!(
            summary
                .iter()
                .all(|l| !l.contains("processed") && !l.contains("verification time")),
            "{summary:#?}"
        );
    }

    /// Degenerate logs give a short summary, never a panic.
    #[test]
    fn summarises_degenerate_logs() {
        assert!(summarize_verifier_log("", 4).is_empty());
        assert_eq!(
            summarize_verifier_log("processed 1 insns\n", 4),
            ["processed 1 insns"]
        );
        let long = "x".repeat(1000);
        assert!(summarize_verifier_log(&long, 4)[0].ends_with("..."));
    }

    /// A LoadError with a verifier log becomes a message with the reason and the path of the
    /// saved log, which holds the whole log.
    #[test]
    fn verifier_rejection_saves_the_log_and_names_it() {
        let log = include_str!("../tests/data/verifier-null-map-value.log");
        let err = aya::programs::ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
        };
        let message = format!(
            "{:#}",
            explain_program_error(err, "load tp_btf/sched_switch")
        );
        assert!(message.contains("map_value_or_null"), "{message}");
        let path = message
            .lines()
            .find_map(|l| l.strip_prefix("the whole verifier log is in "))
            .unwrap_or_else(|| panic!("no path in: {message}"));
        assert!(
            path.contains("livetrace-verifier-tp_btf-sched_switch-"),
            "{path}"
        );
        assert_eq!(std::fs::read_to_string(path).unwrap(), log);
        std::fs::remove_file(path).unwrap();
    }
}
