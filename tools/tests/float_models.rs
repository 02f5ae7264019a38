//! Float paths end to end: the f32 ResNet-8 artifact scores like the reference model on CIFAR-10
//! images, and the same model stored as f16 (`kiln convert --fp16`) agrees with it.

mod common;

use kiln::convert::{convert_tflite_with, Precision};
use kiln::npy::Array;
use kiln::runner::{run_batch, Outputs};

fn cifar(dir: &std::path::Path) -> (Array, Vec<i64>) {
    let mut npz = npyz::npz::NpzArchive::open(dir.join("data/ic01.npz")).unwrap();
    let x = npz.by_name("x").unwrap().unwrap();
    let shape: Vec<usize> = x.shape().iter().map(|&d| d as usize).collect();
    // The float ResNet-8 takes raw pixel values (its int8 twin's input scale is 1.0, zero point -128).
    let data: Vec<f32> = x
        .into_vec::<u8>()
        .unwrap()
        .into_iter()
        .map(f32::from)
        .collect();
    let y: Vec<i64> = npz
        .by_name("y")
        .unwrap()
        .unwrap()
        .into_vec::<i16>()
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    (Array::F32 { shape, data }, y)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

#[test]
fn resnet8_f32_and_f16_artifacts_classify_cifar10() {
    let Some(dir) = common::testdata() else {
        return;
    };
    let source = std::fs::read(common::mlperf(&dir, "pretrainedResnet.tflite")).unwrap();
    let (x, y) = cifar(&dir);
    let f32_art = convert_tflite_with(&source, "resnet8", None, Precision::AsSource).unwrap();
    let f16_art = convert_tflite_with(&source, "resnet8", None, Precision::Fp16).unwrap();
    assert_eq!(
        f16_art.lowered.arena_bytes * 2,
        f32_art.lowered.arena_bytes,
        "f16 halves the arena"
    );
    assert!(
        f16_art.lowered.weights.len() * 10 < f32_art.lowered.weights.len() * 6,
        "f16 roughly halves the weights"
    );

    let Outputs::F32(p32) = run_batch(&f32_art.artifact, &x, |_| {}).unwrap().outputs else {
        panic!("f32 outputs")
    };
    let Outputs::F16(p16) = run_batch(&f16_art.artifact, &x, |_| {}).unwrap().outputs else {
        panic!("f16 outputs")
    };
    let p16: Vec<f32> = p16.iter().map(|v| v.to_f32()).collect();
    let n = y.len();
    let top1 = (0..n)
        .filter(|&i| argmax(&p32[i * 10..(i + 1) * 10]) as i64 == y[i])
        .count();
    let agree = (0..n)
        .filter(|&i| argmax(&p32[i * 10..(i + 1) * 10]) == argmax(&p16[i * 10..(i + 1) * 10]))
        .count();
    let max_diff = p32
        .iter()
        .zip(&p16)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "resnet8 f32 top-1 {top1}/{n}, f16 agrees on {agree}/{n}, max |p32 - p16| = {max_diff}"
    );
    assert!(
        top1 * 100 >= n * 84,
        "f32 top-1 {top1}/{n} is below the MLPerf Tiny quality target region"
    );
    assert!(
        agree * 100 >= n * 99,
        "f16 agrees with f32 on only {agree}/{n}"
    );
    assert!(
        max_diff < 0.02,
        "f16 probabilities differ from f32 by {max_diff}"
    );
}
