//! Bindings generated from `wit/`. Domain types never reuse these names;
//! conversions live in `instance.rs`.
#![allow(missing_docs, missing_debug_implementations)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "retrain-strategy",
});
