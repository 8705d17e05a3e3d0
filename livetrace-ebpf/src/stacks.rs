//! Maps and helpers shared by the stack-sampling tools (profile, offcpu): target filtering,
//! stack collection with failures kept as negated errnos, and the weighted-stack aggregation.

use aya_ebpf::{
    Global,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    btf_maps::{ArrayOfMaps, HashMap as CountMap},
    maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
    programs::tracing::StackIdContext,
};
use livetrace_common::stacks::{
    Counter, STACK_ID_NOT_COLLECTED, STACK_KIND_KERNEL, STACK_KIND_USER, StackKey, stack_errno,
};

// The maps are defined by the tools' binaries ([`target_maps!`](crate::target_maps),
// [`stack_maps!`](crate::stack_maps)), so that each object holds only the maps its tool uses;
// the functions here reach them by name.
unsafe extern "Rust" {
    static STACK_COUNTS: CountsSlot<StackKey>;
    static STACK_TRACES: StackTrace;
    static COUNTERS: PerCpuArray<u64>;
    static TARGET_TGIDS: HashMap<u32, u8>;
    static TARGET_TIDS: HashMap<u32, u8>;
    static HELD_COMMAND_STARTED: Array<u32>;
    static SEEN_PROCESSES: HashMap<u32, u8>;
    static NEW_PROCESSES: RingBuf;
}

/// Defines the maps every tool's object needs to filter targets and announce new processes.
#[macro_export]
macro_rules! target_maps {
    () => {
        #[aya_ebpf::macros::map]
        static TARGET_TGIDS: aya_ebpf::maps::HashMap<u32, u8> =
            aya_ebpf::maps::HashMap::with_max_entries(livetrace_common::stacks::MAX_TARGETS, 0);
        #[aya_ebpf::macros::map]
        static TARGET_TIDS: aya_ebpf::maps::HashMap<u32, u8> =
            aya_ebpf::maps::HashMap::with_max_entries(livetrace_common::stacks::MAX_TARGETS, 0);
        #[aya_ebpf::macros::map]
        static HELD_COMMAND_STARTED: aya_ebpf::maps::Array<u32> =
            aya_ebpf::maps::Array::with_max_entries(1, 0);
        #[aya_ebpf::macros::map]
        static SEEN_PROCESSES: aya_ebpf::maps::HashMap<u32, u8> =
            aya_ebpf::maps::HashMap::with_max_entries(
                livetrace_common::stacks::MAX_SEEN_PROCESSES,
                0,
            );
        #[aya_ebpf::macros::map]
        static NEW_PROCESSES: aya_ebpf::maps::RingBuf = aya_ebpf::maps::RingBuf::with_byte_size(
            livetrace_common::stacks::NEW_PROCESSES_BYTES,
            0,
        );
    };
}

/// Defines the maps of the stack-sampling tools (profile, offcpu): the weighted stacks, the
/// stacks themselves, and the counters.
#[macro_export]
macro_rules! stack_maps {
    () => {
        #[aya_ebpf::macros::btf_map]
        static STACK_COUNTS: $crate::stacks::CountsSlot<livetrace_common::stacks::StackKey> =
            $crate::stacks::CountsSlot::new();
        #[aya_ebpf::macros::map]
        static STACK_TRACES: aya_ebpf::maps::StackTrace =
            aya_ebpf::maps::StackTrace::with_max_entries(
                livetrace_common::stacks::DEFAULT_STACK_STORAGE,
                0,
            );
        #[aya_ebpf::macros::map]
        static COUNTERS: aya_ebpf::maps::PerCpuArray<u64> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(
                livetrace_common::stacks::COUNTER_SLOTS,
                0,
            );
    };
}

/// A count map (key to summed weight). As the slot's template its size is the default: user
/// space creates the real ones at the size asked for, which the kernel accepts (5.10+) for hash
/// maps of the same key, value and flags; before 5.10 only at the template's size.
pub type Counts<K> = CountMap<K, u64, { livetrace_common::stacks::DEFAULT_STACK_STORAGE as usize }>;

/// The one slot through which the programs reach the count map in use. `record` puts a fresh
/// map in it at each cut and takes the old one whole: the kernel returns from that update only
/// once every program that may still hold the old map has finished, so no add straddles a cut.
pub type CountsSlot<K> = ArrayOfMaps<Counts<K>, 1>;

#[unsafe(no_mangle)]
static FILTER_TARGETS: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static STACK_KINDS: Global<u8> = Global::new(STACK_KIND_USER | STACK_KIND_KERNEL);
#[unsafe(no_mangle)]
static PER_THREAD: Global<u8> = Global::new(0);
#[unsafe(no_mangle)]
static HELD_COMMAND: Global<u32> = Global::new(0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = unsafe { &COUNTERS }.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it, and BPF programs do not nest on one CPU here.
        unsafe { *slot += 1 };
    }
}

/// Whether the thread is one we were asked to watch. A held command is not, until it has
/// exec'd: before that, it is livetrace's own shim waiting to be released.
#[inline(always)]
pub fn is_target(tgid: u32, tid: u32) -> bool {
    let held = HELD_COMMAND.load();
    if held != 0 && tgid == held && !held_command_started() {
        return false;
    }
    if FILTER_TARGETS.load() == 0 {
        return true;
    }
    unsafe { TARGET_TGIDS.get(tgid).is_some() || TARGET_TIDS.get(tid).is_some() }
}

#[inline(always)]
fn held_command_started() -> bool {
    unsafe { &HELD_COMMAND_STARTED }
        .get(0)
        .is_some_and(|&started| started != 0)
}

/// At an exec by `tgid`: if it is the held command, it has become the command, and from now on
/// it is a target.
#[inline(always)]
pub fn note_exec(tgid: u32) {
    let held = HELD_COMMAND.load();
    if held != 0
        && tgid == held
        && let Some(started) = unsafe { &HELD_COMMAND_STARTED }.get_ptr_mut(0)
    {
        unsafe { *started = 1 };
    }
}

/// Makes a process a target (a child of one, when following forks); false if the map is full.
#[inline(always)]
pub fn add_target_tgid(tgid: u32) -> bool {
    unsafe { &TARGET_TGIDS }.insert(tgid, 1u8, 0).is_ok()
}

/// The aggregation key for the current thread. `in_kernel` says whether there is a kernel stack
/// worth walking (a sample taken in user mode has none).
#[inline(always)]
pub fn current_key<C: StackIdContext>(ctx: &C, tgid: u32, tid: u32, in_kernel: bool) -> StackKey {
    let kinds = STACK_KINDS.load();
    let user_stack_id = if kinds & STACK_KIND_USER != 0 {
        stack_id(ctx, u64::from(BPF_F_USER_STACK))
    } else {
        STACK_ID_NOT_COLLECTED
    };
    let kernel_stack_id = kernel_stack_id(ctx, in_kernel);
    StackKey {
        tgid,
        tid: if per_thread() { tid } else { 0 },
        user_stack_id,
        kernel_stack_id,
        comm: ctx.command().unwrap_or_default(),
    }
}

/// The kernel stack's id for a sample, or [`STACK_ID_NOT_COLLECTED`] when it was not asked for
/// or there is none (`in_kernel` false).
#[inline(always)]
pub fn kernel_stack_id<C: StackIdContext>(ctx: &C, in_kernel: bool) -> i32 {
    if STACK_KINDS.load() & STACK_KIND_KERNEL != 0 && in_kernel {
        stack_id(ctx, 0)
    } else {
        STACK_ID_NOT_COLLECTED
    }
}

/// Whether keys keep the thread id (per-thread output).
#[inline(always)]
pub fn per_thread() -> bool {
    PER_THREAD.load() != 0
}

/// Whether user stacks were asked for.
#[inline(always)]
pub fn wants_user_stacks() -> bool {
    STACK_KINDS.load() & STACK_KIND_USER != 0
}

/// `bpf_get_stackid` without `BPF_F_REUSE_STACKID`: a hash collision comes back as `-EEXIST`
/// instead of silently overwriting another stack, so it can be counted.
#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, flags: u64) -> i32 {
    match ctx.get_stackid(unsafe { &STACK_TRACES }, flags) {
        Ok(id) => id as i32,
        Err(err) if err < 0 => err,
        Err(_) => -stack_errno::EFAULT,
    }
}

/// An atomic add (BPF_ATOMIC_ADD): several CPUs may bump one entry at once. `core`'s atomic
/// types offer no read-modify-write on the BPF target, so this uses the intrinsic directly.
///
/// # Safety
/// `dst` points to a live, aligned `u64`: a map value the caller just looked up.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, value: u64) {
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, value,
        )
    };
}

/// Tells user space about a process the first time it is recorded, so that its memory map is
/// read while it is alive; `not_announced` counts a failure, in the tool's own counters.
#[inline(always)]
pub fn announce_first_sight(tgid: u32, not_announced: impl FnOnce()) {
    let seen = unsafe { &SEEN_PROCESSES };
    if unsafe { seen.get(tgid) }.is_some() {
        return;
    }
    match seen.insert(tgid, 1u8, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            if unsafe { &NEW_PROCESSES }.output::<u32>(tgid, 0).is_err() {
                not_announced();
            }
        }
        // Another CPU announced it between our lookup and insert.
        Err(err) if err == -stack_errno::EEXIST => {}
        Err(_) => not_announced(),
    }
}

/// [`announce_first_sight`], counted in the stack tools' counters.
#[inline(always)]
pub fn announce(tgid: u32) {
    announce_first_sight(tgid, || count(Counter::NewProcessNotAnnounced));
}

/// Adds `weight` to `key`'s entry in the count map in [`STACK_COUNTS`]'s slot; a full map is
/// counted, not ignored.
#[inline(always)]
pub fn add_weight(key: &StackKey, weight: u64) {
    announce(key.tgid);
    // User space fills the slot before attaching and never empties it: counted as full, were
    // it ever empty.
    match unsafe { &STACK_COUNTS }.get(0) {
        Some(counts) => add_weight_to(counts, key, weight, Counter::CountsMapFull),
        None => count(Counter::CountsMapFull),
    }
}

/// Adds `weight` to `key`'s entry in `map`, creating it if needed; when the map is full,
/// `full` is counted instead.
#[inline(always)]
pub fn add_weight_to<K>(map: &Counts<K>, key: &K, weight: u64, full: Counter) {
    if let Some(total) = map.get_ptr_mut(key) {
        // SAFETY: the map value just looked up.
        unsafe { atomic_add(total, weight) };
        count(Counter::Recorded);
        return;
    }
    match map.insert(key, weight, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(Counter::Recorded),
        // Another CPU created the entry between our lookup and insert.
        Err(_) => match map.get_ptr_mut(key) {
            Some(total) => {
                // SAFETY: as above.
                unsafe { atomic_add(total, weight) };
                count(Counter::Recorded);
            }
            None => count(full),
        },
    }
}
