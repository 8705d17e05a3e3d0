//! tracefs, for the classic-tracepoint fallback: make sure it is mounted (mounting it when we
//! may), and read a tracepoint's record layout from its `format` file.

use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context as _, bail};

const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Where tracefs stands for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Mounted, and its events can be read here.
    Readable(&'static str),
    /// Mounted, but this process may not look inside (the mount point is mode 0700, root's).
    Unreadable(&'static str),
    NotMounted,
}

pub fn status() -> Status {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut unreadable = None;
    for dir in MOUNT_POINTS {
        match fs::metadata(Path::new(dir).join("events")) {
            Ok(meta) if meta.is_dir() => return Status::Readable(dir),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                let mounted = mounts.lines().any(|line| {
                    let mut fields = line.split_ascii_whitespace().skip(1);
                    fields.next() == Some(dir) && fields.next() == Some("tracefs")
                });
                if mounted && unreadable.is_none() {
                    unreadable = Some(dir);
                }
            }
            _ => {}
        }
    }
    unreadable.map_or(Status::NotMounted, Status::Unreadable)
}

/// The tracefs directory, mounting tracefs at /sys/kernel/tracing if no mount is there yet.
pub fn ensure_mounted() -> anyhow::Result<&'static Path> {
    match status() {
        Status::Readable(dir) => return Ok(Path::new(dir)),
        Status::Unreadable(dir) => bail!(
            "tracefs is mounted at {dir}, but this process may not read it (it is root's, mode \
             0700): run livetrace as root, or with CAP_DAC_READ_SEARCH"
        ),
        Status::NotMounted => {}
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) of tracefs with constant, NUL-terminated arguments.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({err}; mounting needs \
             CAP_SYS_ADMIN); run `mount -t tracefs nodev /sys/kernel/tracing` as root"
        );
    }
    Ok(Path::new(MOUNT_POINTS[0]))
}

/// Field name -> (offset, size) from `events/<category>/<name>/format`.
pub fn field_offsets(category: &str, name: &str) -> anyhow::Result<HashMap<String, (u32, u32)>> {
    let dir = ensure_mounted()?;
    let path = dir.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read the tracepoint format {}", path.display()))?;
    Ok(parse_format(&text))
}

fn parse_format(text: &str) -> HashMap<String, (u32, u32)> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut name = None;
        let mut offset = None;
        let mut size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(decl) = part.strip_prefix("field:") {
                name = decl
                    .split_whitespace()
                    .last()
                    .map(|n| n.split('[').next().unwrap_or(n).to_owned());
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(name), Some(offset), Some(size)) = (name, offset, size) {
            fields.insert(name, (offset, size));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets and sizes come out of a real sched_switch format file's layout.
    #[test]
    fn parses_sched_switch_format() {
        let format = "\
name: sched_switch
ID: 321
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:unsigned int prev_state;\toffset:32;\tsize:4;\tsigned:0;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;

print fmt: \"prev_comm=%s\"";
        let fields = parse_format(format);
        assert_eq!(fields["prev_pid"], (24, 4));
        assert_eq!(fields["prev_state"], (32, 4));
        assert_eq!(fields["next_pid"], (56, 4));
        assert_eq!(fields["prev_comm"], (8, 16));
    }
}
