//! End-to-end tests: the real `visutility` binary, real `.wasm` components
//! built from source by `host/build.rs`.

mod cli;
mod detectors;
mod river;
mod runtime;
mod sandbox;
mod service;
mod swap;
mod util;
