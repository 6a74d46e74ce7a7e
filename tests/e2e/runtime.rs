//! The runtime library with real components.

use visutility_host::runtime::{
    PointBatch, StrategyComponent, StrategyFault, StrategySource, VerdictKind,
};
use visutility_host::{Limits, LoadError};

use crate::util::{Lcg, guest};

fn baseline() -> StrategyComponent {
    StrategyComponent::load(&StrategySource::Builtin("baseline".into())).unwrap()
}

fn batch(scores: &[f64]) -> PointBatch {
    let mut b = PointBatch::new();
    for (i, &s) in scores.iter().enumerate() {
        b.push_score(s, 1_000 + i as i64);
    }
    b
}

#[test]
fn restored_detector_continues_exactly_as_if_never_stopped() {
    let mut rng = Lcg::new(99);
    let scores: Vec<f64> = (0..400).map(|_| 0.8 + 0.2 * rng.next_f64()).collect();
    let config = r#"{"warmup": 50, "tolerance": 0.03}"#;

    let mut straight = baseline().instantiate(config, Limits::default()).unwrap();
    let expected: Vec<usize> = straight
        .evaluate("m", &batch(&scores))
        .unwrap()
        .iter()
        .map(|v| v.index)
        .collect();
    assert!(!expected.is_empty());

    // Stop mid-warm-up, save, restore into a brand-new instance, continue.
    let mut first = baseline().instantiate(config, Limits::default()).unwrap();
    let mut got: Vec<usize> = first
        .evaluate("m", &batch(&scores[..30]))
        .unwrap()
        .iter()
        .map(|v| v.index)
        .collect();
    let state = first.save("m").unwrap().expect("a detector exists for m");
    drop(first);
    let mut second = baseline().instantiate(config, Limits::default()).unwrap();
    second
        .restore("m", &state)
        .unwrap()
        .expect("state accepted");
    got.extend(
        second
            .evaluate("m", &batch(&scores[30..]))
            .unwrap()
            .iter()
            .map(|v| v.index + 30),
    );
    assert_eq!(got, expected);
}

#[test]
fn garbage_state_is_refused_with_a_reason_and_the_detector_kept() {
    let mut inst = baseline()
        .instantiate(r#"{"baseline": 0.9}"#, Limits::default())
        .unwrap();
    let refused = inst.restore("m", b"not a state").unwrap().unwrap_err();
    assert!(
        refused.contains("saved state does not fit strategy `baseline`"),
        "{refused}"
    );
    let v = inst.evaluate("m", &batch(&[0.5])).unwrap();
    assert_eq!(v[0].kind, VerdictKind::Retrain);
}

#[test]
fn models_are_multiplexed_with_separate_state() {
    let mut inst = baseline()
        .instantiate(r#"{"warmup": 2}"#, Limits::default())
        .unwrap();
    assert!(inst.evaluate("a", &batch(&[0.9, 0.9])).unwrap().is_empty());
    assert!(inst.evaluate("b", &batch(&[0.5, 0.5])).unwrap().is_empty());
    // a's baseline is 0.9, b's is 0.5: 0.6 degrades a but not b.
    assert_eq!(inst.evaluate("a", &batch(&[0.6])).unwrap().len(), 1);
    assert!(inst.evaluate("b", &batch(&[0.6])).unwrap().is_empty());
    let mut models: Vec<&str> = inst.models().collect();
    models.sort();
    assert_eq!(models, ["a", "b"]);
}

#[test]
fn a_failed_call_poisons_the_instance_and_fuel_is_reported() {
    let hostile = StrategyComponent::load(&StrategySource::File(guest("hostile").into())).unwrap();
    let mut inst = hostile
        .instantiate(r#"{"mode":"ok"}"#, Limits::default())
        .unwrap();
    inst.evaluate("m", &batch(&[0.5; 100])).unwrap();
    assert!(inst.last_fuel() > 0, "fuel used must be measured");

    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    let mut inst = hostile.instantiate(r#"{"mode":"loop"}"#, limits).unwrap();
    let err = inst.evaluate("m", &batch(&[0.5])).unwrap_err();
    assert_eq!(err.fault, StrategyFault::OutOfFuel { budget: 5_000_000 });
    assert!(inst.is_poisoned());
    assert_eq!(
        inst.evaluate("m", &batch(&[0.5])).unwrap_err().fault,
        StrategyFault::Poisoned
    );
}

#[test]
fn configure_errors_are_load_errors_naming_the_strategy() {
    let err = baseline()
        .instantiate(r#"{"baseline": "high"}"#, Limits::default())
        .unwrap_err();
    assert!(matches!(err, LoadError::Config { .. }), "{err}");
    assert!(err.to_string().contains("builtin:baseline"), "{err}");
}
