//! Folded stacks (`frame;frame;leaf weight`, root first, one stack per line): the format of
//! Brendan Gregg's stackcollapse scripts, read by inferno, speedscope and most flamegraph tools.

use std::io::{self, Write};

use crate::model::StackProfile;

pub fn write<W: Write>(profile: &StackProfile, mut out: W) -> io::Result<()> {
    for line in lines(profile) {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// One folded line per distinct stack of names, in a deterministic order.
pub fn lines(profile: &StackProfile) -> impl Iterator<Item = String> + use<> {
    profile.by_name().into_iter().map(|stack| {
        let names: Vec<String> = stack.frames.iter().map(|f| f.display_name()).collect();
        format!("{} {}", names.join(";"), stack.weight)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataQuality, Frame, FrameKind, WeightUnit, WeightedStack};

    fn stack(frames: &[(FrameKind, &str)], weight: u64) -> WeightedStack {
        WeightedStack {
            frames: frames.iter().map(|(k, n)| Frame::new(*k, *n)).collect(),
            weight,
        }
    }

    /// Root first, kernel frames suffixed `_[k]`, separators inside names neutralised, and
    /// identical stacks merged.
    #[test]
    fn folds_root_first_with_kernel_suffix() {
        use FrameKind::*;
        let mut profile = StackProfile {
            title: "t".into(),
            unit: WeightUnit::Samples,
            period_ns: None,
            stacks: vec![
                stack(&[(Process, "app"), (User, "main"), (User, "work")], 3),
                stack(
                    &[(Process, "app"), (User, "main"), (Kernel, "do_syscall_64")],
                    2,
                ),
                stack(&[(Process, "app"), (User, "a;b")], 1),
                stack(&[(Process, "app"), (User, "main"), (User, "work")], 4),
            ],
            quality: DataQuality::default(),
            build_ids: Default::default(),
        };
        profile.normalize();
        let mut out = Vec::new();
        write(&profile, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "app;a:b 1\napp;main;do_syscall_64_[k] 2\napp;main;work 7\n"
        );
    }
}
