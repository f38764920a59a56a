//! Our training step is PyTorch's reference step: ten steps of a small
//! DCGAN from the same weights, batches and noise, compared tensor by
//! tensor (losses, every layer's gradient, weights and BatchNorm running
//! statistics after steps 1, 2 and 10) with PyTorch's outputs stored in
//! `fixtures/parity/` (made by `scripts/parity/dcgan_parity.py`), within
//! float32 round-off. CI needs no PyTorch.

use std::path::Path;

use common::Config;
use worker::tools::parity::{self, Tape};

/// The configuration the fixture was made with (`worker parity --tapes DIR
/// --image-size 16 --ngf 8 --ndf 8 --batch-size 8 --seed 42` with
/// GANCLUSTER__MODEL__NZ=16, then `python3 scripts/parity/dcgan_parity.py DIR`).
fn config() -> Config {
    let overrides = [
        ("model.image_size", "16".to_string()),
        ("model.nz", "16".to_string()),
        ("model.ngf", "8".to_string()),
        ("model.ndf", "8".to_string()),
        ("train.batch_size", "8".to_string()),
        ("train.seed", "42".to_string()),
    ];
    Config::load_with_env(None, &overrides, Some(Default::default())).unwrap()
}

#[test]
fn ten_steps_match_pytorchs_reference_within_round_off() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let reference = Tape::read(&fixture, "torch").unwrap();
    let (inputs, ours) = parity::record(&config(), 10).unwrap();
    assert_eq!(
        reference.meta.get("inputs_sha256"),
        Some(&parity::fingerprint(&inputs)),
        "the fixture was made from other weights, batches or noise: regenerate it as this \
         file's `config` says"
    );
    let differences = parity::compare(&ours, &reference).unwrap();
    assert_eq!(differences.len(), ours.tensors.len());
    let off: Vec<String> = differences
        .iter()
        .filter(|d| !d.passes())
        .map(|d| {
            format!(
                "{} rel {:.2e} (tolerance {:.0e})",
                d.name, d.relative, d.tolerance
            )
        })
        .collect();
    assert!(
        off.is_empty(),
        "tensors off PyTorch's reference:\n{}",
        off.join("\n")
    );
    for kind in [
        "loss.9",
        "grad.1.G.0.weight",
        "state.10.G.1.running_var",
        "state.2.D.3.bias",
    ] {
        assert!(ours.get(kind).is_some(), "{kind} was not compared");
    }
}
