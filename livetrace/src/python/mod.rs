//! Python functions by name in a live CPython (3.8 to 3.13) that was not started with
//! `-X perf`. User space finds the interpreter and each thread's state ([`process`]) and tells
//! the BPF program; at each sample the program walks the thread's frame chain and sends the
//! code objects and instruction pointers it found; the unwinding thread names them ([`code`])
//! and puts them above the native frames of the evaluation function that runs them ([`merge`]).
//! See docs/python.md.

pub mod code;
pub mod layout;
pub mod merge;
pub mod process;
pub mod threads;

pub use self::{
    merge::{PythonFrame, is_python, python_index},
    process::{Found, Interpreter},
};
pub mod watch;

pub use self::watch::{Interpreters, Watch};
