// Empty on purpose: this library target lets `livetrace` list the crate as a build-dependency,
// so cargo rebuilds the BPF object when these sources change. The programs are in main.rs.
#![no_std]
