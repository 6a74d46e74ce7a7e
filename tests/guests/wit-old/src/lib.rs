//! Test guest: a strategy built against an old, incompatible version of
//! the WIT package (`visutility:strategy@0.0.1`). The host must refuse it and
//! name both versions.

#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({
        inline: "
            package visutility:strategy@0.0.1;
            interface strategy {
                describe: func() -> string;
            }
            world retrain-strategy {
                export strategy;
            }
        ",
    });

    struct Next;

    impl exports::visutility::strategy::strategy::Guest for Next {
        fn describe() -> String {
            "from the past".into()
        }
    }

    export!(Next);
}
