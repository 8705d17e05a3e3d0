//! Types and pure logic shared by livetrace's BPF programs (`livetrace-ebpf`) and its user-space
//! loader (`livetrace`). Everything here is `#[repr(C)]` with explicit padding so that both sides
//! agree on the layout, and `no_std` so that it runs in the kernel. The `user` feature adds
//! `aya::Pod` impls so the loader can read these types out of BPF maps.
#![no_std]

pub mod control;
pub mod follow;
pub mod histogram;
pub mod objects;
pub mod offcpu;
pub mod python;
pub mod stacks;
pub mod unwind;
pub mod uprobe_hist;
pub mod usdt;
