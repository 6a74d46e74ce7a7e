//! Test guest: a real, working component that exports another world (a
//! calculator, not `visutility:strategy`). The host must refuse it as a
//! component for another world, not crash or call into it.

#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({
        inline: "
            package acme:calculator@1.0.0;
            interface calculate {
                add: func(a: f64, b: f64) -> f64;
            }
            world calculator {
                export calculate;
            }
        ",
    });

    struct Calculator;

    impl exports::acme::calculator::calculate::Guest for Calculator {
        fn add(a: f64, b: f64) -> f64 {
            a + b
        }
    }

    export!(Calculator);
}
