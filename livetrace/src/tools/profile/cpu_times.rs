//! Why a whole-system profile took fewer samples than CPUs × rate × time. Each CPU's sampling
//! timer should fire at the rate on a busy and an idle CPU alike; one that delivers much less
//! is explained from what the CPU did meanwhile, per `/proc/stat`: a virtual CPU that the
//! hypervisor did not run (its steal time) takes one sample when its timer finally fires, not
//! the ones it missed (perf's hrtimer skips the overrun), and a CPU that goes offline is not
//! sampled again (its perf event is disabled; /proc/stat does not count its offline time).

use std::collections::BTreeMap;

/// One CPU's time so far, in seconds, from `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    /// Every state (user, system, idle, iowait, irq, softirq, steal).
    pub total: f64,
    /// Time the hypervisor ran something else on this virtual CPU.
    pub steal: f64,
}

/// Each CPU's [`CpuTime`], by CPU number; empty if /proc/stat cannot be read.
pub fn read() -> BTreeMap<usize, CpuTime> {
    std::fs::read_to_string("/proc/stat")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

fn parse(text: &str) -> BTreeMap<usize, CpuTime> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let values: Vec<f64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
            (values.len() == 8).then(|| {
                let time = CpuTime {
                    total: values.iter().sum::<f64>() / ticks,
                    steal: values[7] / ticks,
                };
                (cpu, time)
            })
        })
        .collect()
}

/// What one CPU did over the capture, with the samples it delivered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuWindow {
    pub cpu: usize,
    pub samples: u64,
    /// The change of its [`CpuTime`] over the capture, if it was read at both ends.
    pub time: Option<CpuTime>,
}

/// One line for each CPU that delivered less than 80% of `expected` samples, saying why where
/// the CPU's times tell, over a window of `seconds`.
pub fn shortfall_notes(cpus: &[CpuWindow], expected: f64, seconds: f64) -> Vec<String> {
    cpus.iter()
        .filter(|c| (c.samples as f64) < 0.8 * expected)
        .map(|c| {
            let head = format!(
                "CPU {} took {} samples of about {expected:.0}",
                c.cpu, c.samples
            );
            match c.time {
                Some(t) if t.steal >= 0.2 * seconds => format!(
                    "{head}: the hypervisor ran something else on it for {:.2} s of the {seconds:.2} s \
                     (steal time), and a sampling timer that fires late takes one sample, not the \
                     ones it missed",
                    t.steal
                ),
                Some(t) if t.total < 0.95 * seconds => format!(
                    "{head}: it was offline for {:.2} s of the {seconds:.2} s, and a CPU that goes \
                     offline is not sampled again until the next capture",
                    seconds - t.total
                ),
                _ => format!(
                    "{head}, and its times in /proc/stat do not say why (its timer interrupts did \
                     not arrive: check for a hypervisor that parks idle virtual CPUs)"
                ),
            }
        })
        .collect()
}

/// `after - before` for each CPU read at both ends.
pub fn delta(
    before: &BTreeMap<usize, CpuTime>,
    after: &BTreeMap<usize, CpuTime>,
) -> BTreeMap<usize, CpuTime> {
    after
        .iter()
        .filter_map(|(cpu, a)| {
            let b = before.get(cpu)?;
            Some((
                *cpu,
                CpuTime {
                    total: a.total - b.total,
                    steal: a.steal - b.steal,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/stat's per-CPU lines are read (the aggregate `cpu` line is not a CPU).
    #[test]
    fn reads_per_cpu_lines() {
        let text = "cpu  10 0 10 100 0 0 0 20 0 0\n\
                    cpu0 5 0 5 50 0 0 0 0 0 0\n\
                    cpu1 5 0 5 50 0 0 0 20 0 0\n\
                    intr 123\n";
        let cpus = parse(text);
        assert_eq!(cpus.len(), 2);
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((cpus[&1].steal - 20.0 / ticks).abs() < 1e-9);
        assert!((cpus[&0].total - 60.0 / ticks).abs() < 1e-9);
    }

    /// A CPU short of samples is explained by its steal time, by being offline, or said to be
    /// unexplained; one that delivered is not mentioned.
    #[test]
    fn explains_each_cpu_that_fell_short() {
        let time = |total, steal| Some(CpuTime { total, steal });
        let cpus = [
            CpuWindow {
                cpu: 0,
                samples: 198,
                time: time(2.0, 0.0),
            },
            CpuWindow {
                cpu: 1,
                samples: 3,
                time: time(2.0, 1.9),
            },
            CpuWindow {
                cpu: 2,
                samples: 0,
                time: time(0.1, 0.0),
            },
            CpuWindow {
                cpu: 3,
                samples: 50,
                time: time(2.0, 0.0),
            },
        ];
        let notes = shortfall_notes(&cpus, 198.0, 2.0);
        assert_eq!(notes.len(), 3, "{notes:#?}");
        assert!(notes[0].starts_with("CPU 1 took 3 samples") && notes[0].contains("steal"));
        assert!(notes[1].contains("offline for 1.90 s"), "{}", notes[1]);
        assert!(notes[2].contains("do not say why"));
    }
}
