//! The language runtimes whose functions an ELF symbol table does not name (a JIT's generated
//! code, an interpreter's frames): how to recognise one in a process, and what its user does to
//! get its functions named. Shared by the profile's advice and by `livetrace check`, so that
//! both give the same fix in the same words.

use std::path::Path;

/// A runtime livetrace knows how to get named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Jvm,
    Node,
    /// CPython, with its `(major, minor)` version where the file names tell it.
    Python(Option<(u32, u32)>),
}

impl Runtime {
    /// From the executable's file name and the paths of the files the process maps (a JVM is
    /// whatever maps libjvm.so, whatever its launcher is called; CPython may be embedded).
    pub fn detect<'a>(exe_name: &str, mapped: impl IntoIterator<Item = &'a Path>) -> Option<Self> {
        let mut libpython = None;
        for path in mapped {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "libjvm.so" {
                return Some(Self::Jvm);
            }
            if let Some(rest) = name.strip_prefix("libpython") {
                libpython = Some(python_version(rest));
            }
        }
        if exe_name == "node" || exe_name.starts_with("node-") || exe_name == "nodejs" {
            return Some(Self::Node);
        }
        if let Some(rest) = exe_name.strip_prefix("python") {
            return Some(Self::Python(python_version(rest).or(libpython.flatten())));
        }
        libpython.map(Self::Python)
    }

    /// Whether livetrace names this runtime's functions without a perf map, by reading its own
    /// frames (`crate::python`: CPython 3.8 to 3.13, with `--unwind dwarf`).
    pub fn frames_read(self) -> bool {
        matches!(self, Self::Python(Some(version)) if ((3, 8)..=(3, 13)).contains(&version))
    }

    /// `JVM`, `Node.js`, `CPython 3.11`.
    pub fn name(self) -> String {
        match self {
            Self::Jvm => "JVM".into(),
            Self::Node => "Node.js".into(),
            Self::Python(Some((major, minor))) => format!("CPython {major}.{minor}"),
            Self::Python(None) => "CPython".into(),
        }
    }

    /// What names this runtime's functions: the perf map it writes when asked to.
    pub fn advice(self, pid: u32) -> String {
        match self {
            Self::Jvm => format!(
                "have it write its perf map with `jcmd {pid} Compiler.perfmap` (JDK 17+) after \
                 warm-up and before the capture ends, and start it with \
                 -XX:+PreserveFramePointer for complete stacks"
            ),
            Self::Node => "start it with --perf-basic-prof (add \
                           --interpreted-frames-native-stack to name interpreted functions too)"
                .into(),
            // Older than livetrace reads: py-spy does, from outside, and needs no restart.
            Self::Python(Some(version)) if version < (3, 8) => format!(
                "its Python functions show as the interpreter's frames ({}): livetrace reads the \
                 frames of CPython 3.8 to 3.13 only, and CPython before 3.12 writes no perf map; \
                 `py-spy dump --pid {pid}` names them without a restart",
                if version < (3, 6) {
                    "PyEval_EvalFrameEx"
                } else {
                    "_PyEval_EvalFrameDefault"
                }
            ),
            Self::Python(Some(version)) if version > (3, 13) => format!(
                "its Python functions show as the interpreter's frames (_PyEval_EvalFrameDefault): \
                 livetrace reads the frames of CPython 3.8 to 3.13 only; start it with -X perf \
                 (or PYTHONPERFSUPPORT=1) to name them, or, without a restart, \
                 `py-spy dump --pid {pid}`"
            ),
            Self::Python(_) => format!(
                "its Python functions show as the interpreter's frames (_PyEval_EvalFrameDefault) \
                 where their frames were not read: profile and offcpu read them with --unwind \
                 dwarf (the default for -p and a command; offcpu's for code without frame \
                 pointers), and the footer counts what they could not read, by cause \
                 (`py-spy dump --pid {pid}` names them)"
            ),
        }
    }
}

/// `3.11.so.1.0` or `3.11` (what follows `libpython` or `python`) gives (3, 11).
pub(crate) fn python_version(rest: &str) -> Option<(u32, u32)> {
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = digits.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_runtimes_by_executable_and_libraries() {
        let none: [&Path; 0] = [];
        assert_eq!(Runtime::detect("node", none), Some(Runtime::Node));
        assert_eq!(
            Runtime::detect("python3.11", none),
            Some(Runtime::Python(Some((3, 11))))
        );
        assert_eq!(
            Runtime::detect("uwsgi", [Path::new("/usr/lib/libpython3.12.so.1.0")]),
            Some(Runtime::Python(Some((3, 12))))
        );
        assert_eq!(
            Runtime::detect("python3", [Path::new("/opt/py/lib/libpython3.13.so.1.0")]),
            Some(Runtime::Python(Some((3, 13))))
        );
        assert_eq!(
            Runtime::detect("myserver", [Path::new("/usr/lib/jvm/lib/server/libjvm.so")]),
            Some(Runtime::Jvm)
        );
        assert_eq!(Runtime::detect("bash", none), None);
        assert_eq!(Runtime::detect("nodejs-helper", none), None);
    }
}
