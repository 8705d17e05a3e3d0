//! What the stack tools (profile, offcpu) load in common: the target filter, which stacks to
//! collect, the storage for them, stack copies for `--unwind dwarf`, and following a command.

use aya::{Ebpf, EbpfLoader};
use livetrace_common::{follow, stacks, unwind};

use super::{BpfError, Object};

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
    /// Capacity of the stack-trace and count maps.
    pub stack_storage: u32,
    /// `--unwind dwarf` (profile only): bytes of user stack copied per sample; 0 = frame
    /// pointers, walked in the kernel.
    pub stack_copy_bytes: u32,
    /// Size of the ring buffer that carries stack copies to user space (a power of two).
    pub unwind_buffer: u32,
    /// The pid of a command started held (`-- COMMAND`): recorded only from its exec on (see
    /// [`follow_exec`]).
    pub held_command: Option<u32>,
    /// `task_struct.tgid`'s offset, for `follow_fork` to make targets of a target's children.
    pub fork_tgid_offset: Option<u32>,
}

/// The smallest ring buffer the kernel accepts: one page, for tools that copy no stacks.
pub const MIN_RING_BUFFER: u32 = 4096;

impl StackSettings {
    /// Sets the globals and map sizes every stack tool has on `loader`; the tool adds its own.
    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        // Constants borrowed for 'a: promoted to statics.
        let flag = |on: bool| if on { &1u8 } else { &0u8 };
        loader
            .override_global(stacks::FILTER_TARGETS, flag(self.filter), true)
            .override_global(stacks::STACK_KINDS, &self.stack_kinds, true)
            .override_global(stacks::PER_THREAD, flag(self.per_thread), true)
            .override_global(
                stacks::HELD_COMMAND,
                self.held_command.as_ref().unwrap_or(&0),
                true,
            )
            .override_global(
                follow::FORK_TGID_OFFSET,
                self.fork_tgid_offset.as_ref().unwrap_or(&0),
                true,
            )
            .map_max_entries(stacks::STACK_TRACES, self.stack_storage)
            .override_global(unwind::STACK_COPY_BYTES, &self.stack_copy_bytes, true)
            .map_max_entries(
                unwind::UNWIND_SAMPLES,
                if self.stack_copy_bytes == 0 {
                    MIN_RING_BUFFER
                } else {
                    self.unwind_buffer
                },
            )
            .map_max_entries(
                unwind::COPY_LIMITS,
                if self.stack_copy_bytes == 0 {
                    1
                } else {
                    livetrace_common::offcpu::MAX_THREADS
                },
            );
    }

    /// Fills the target maps of a loaded object.
    pub fn fill_targets(&self, bpf: &mut Ebpf) -> anyhow::Result<()> {
        super::set_targets(bpf, &self.tgids, &self.tids)
    }
}

/// Loads `object` with only the stack tools' settings (profile has no others).
pub fn load(object: Object, settings: &StackSettings) -> anyhow::Result<Ebpf> {
    refuse_stack_copies_for_test(settings)?;
    let mut loader = EbpfLoader::new();
    settings.apply(&mut loader);
    let mut bpf = super::load(object, &mut loader)?;
    settings.fill_targets(&mut bpf)?;
    Ok(bpf)
}

/// A test hook: with `LIVETRACE_TEST_REFUSE_STACK_COPIES=1`, programs that copy stacks are
/// refused as a kernel's verifier would refuse them, so that the fallback to frame pointers is
/// exercised on kernels that accept them.
pub fn refuse_stack_copies_for_test(settings: &StackSettings) -> Result<(), BpfError> {
    if settings.stack_copy_bytes != 0
        && std::env::var_os("LIVETRACE_TEST_REFUSE_STACK_COPIES").is_some()
    {
        return Err(BpfError::Rejected(
            "the kernel's verifier rejected it (refused by LIVETRACE_TEST_REFUSE_STACK_COPIES)"
                .into(),
        ));
    }
    Ok(())
}
