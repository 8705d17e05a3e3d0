//! One module per subcommand: each parses its own arguments, drives its BPF programs through a
//! capture, and hands a model to the renderers.

pub mod check;
pub mod diff;
pub mod offcpu;
pub mod profile;
pub mod uprobe_hist;
