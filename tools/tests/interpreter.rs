//! The interpreter API on real models: several models side by side in separate arenas, float
//! inputs quantized at the edge, dequantized outputs, errors that leave the interpreter usable.

mod common;

use kiln::artifact::AlignedBytes;
use kiln::npy::read_npz_i8;
use kiln_runtime::{Interpreter, InvokeError, Model, ModelError};

fn artifact(file: &str) -> Option<AlignedBytes> {
    let dir = common::testdata()?;
    let source = std::fs::read(common::mlperf(&dir, file)).expect("read model");
    Some(AlignedBytes::new(
        &kiln::convert::convert_tflite(&source, file)
            .expect("convert")
            .artifact,
    ))
}

#[test]
fn two_models_run_side_by_side_in_separate_arenas() {
    let (Some(kws), Some(ad), Some(dir)) = (
        artifact("kws_ref_model.tflite"),
        artifact("ad01_int8.tflite"),
        common::testdata(),
    ) else {
        return;
    };
    let (_, kws_in) = read_npz_i8(&dir.join("golden/kws_ref_model.npz"), "input").unwrap();
    let (_, kws_out) = read_npz_i8(&dir.join("golden/kws_ref_model.npz"), "output").unwrap();
    let (_, ad_in) = read_npz_i8(&dir.join("golden/ad01_int8.npz"), "input").unwrap();
    let (_, ad_out) = read_npz_i8(&dir.join("golden/ad01_int8.npz"), "output").unwrap();
    let m1 = Model::load(kws.as_slice()).unwrap();
    let m2 = Model::load(ad.as_slice()).unwrap();
    let mut a1 = AlignedBytes::zeroed(m1.arena_bytes());
    let mut a2 = AlignedBytes::zeroed(m2.arena_bytes());
    let mut i1 = Interpreter::new(m1, a1.as_mut_slice()).unwrap();
    let mut i2 = Interpreter::new(m2, a2.as_mut_slice()).unwrap();
    for s in 0..20 {
        // Interleave: set both inputs, then invoke both, then read both.
        i1.set_input_i8(0, &kws_in[s * 490..(s + 1) * 490]).unwrap();
        i2.set_input_i8(0, &ad_in[s * 640..(s + 1) * 640]).unwrap();
        i2.invoke().unwrap();
        i1.invoke().unwrap();
        assert_eq!(
            i1.output_i8(0).unwrap(),
            &kws_out[s * 12..(s + 1) * 12],
            "kws sample {s}"
        );
        assert_eq!(
            i2.output_i8(0).unwrap(),
            &ad_out[s * 640..(s + 1) * 640],
            "ad sample {s}"
        );
    }
}

#[test]
fn float_inputs_are_quantized_at_the_edge_and_outputs_dequantized() {
    let (Some(kws), Some(dir)) = (artifact("kws_ref_model.tflite"), common::testdata()) else {
        return;
    };
    let (_, kws_in) = read_npz_i8(&dir.join("golden/kws_ref_model.npz"), "input").unwrap();
    let (_, kws_out) = read_npz_i8(&dir.join("golden/kws_ref_model.npz"), "output").unwrap();
    let model = Model::load(kws.as_slice()).unwrap();
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice()).unwrap();
    let q = interp.input_info(0).unwrap().quant.unwrap();
    // Real values that quantize back to exactly the golden int8 input.
    let real: Vec<f32> = kws_in[..490]
        .iter()
        .map(|&v| q.scale * (v as i32 - q.zero_point) as f32)
        .collect();
    interp.set_input_f32(0, &real).unwrap();
    let raw: Vec<i8> = interp
        .input_bytes_mut(0)
        .unwrap()
        .iter()
        .map(|&b| b as i8)
        .collect();
    assert_eq!(raw, &kws_in[..490]);
    interp.invoke().unwrap();
    assert_eq!(interp.output_i8(0).unwrap(), &kws_out[..12]);
    let oq = interp.output_info(0).unwrap().quant.unwrap();
    let mut probs = [0f32; 12];
    interp.output_f32(0, &mut probs).unwrap();
    for (p, &v) in probs.iter().zip(&kws_out[..12]) {
        assert_eq!(
            *p,
            (oq.scale as f64 * (v as i32 - oq.zero_point) as f64) as f32
        );
    }
    let sum: f32 = probs.iter().sum();
    assert!(
        (sum - 1.0).abs() < 0.05,
        "softmax probabilities sum to {sum}"
    );
}

#[test]
fn bad_calls_are_errors_and_the_interpreter_stays_usable() {
    let Some(kws) = artifact("kws_ref_model.tflite") else {
        return;
    };
    let model = Model::load(kws.as_slice()).unwrap();
    let mut small = AlignedBytes::zeroed(model.arena_bytes() - 1);
    assert!(matches!(
        Interpreter::new(model, small.as_mut_slice()),
        Err(ModelError::ArenaTooSmall { .. })
    ));
    let mut arena = AlignedBytes::zeroed(model.arena_bytes() + 16);
    assert!(matches!(
        Interpreter::new(model, &mut arena.as_mut_slice()[1..]),
        Err(ModelError::Misaligned { .. })
    ));
    let mut interp = Interpreter::new(model, arena.as_mut_slice()).unwrap();
    assert_eq!(
        interp.set_input_i8(0, &[0; 3]),
        Err(InvokeError::LengthMismatch {
            expected: 490,
            given: 3
        })
    );
    assert_eq!(
        interp.set_input_i8(1, &[0; 490]),
        Err(InvokeError::NoSuchTensor { index: 1 })
    );
    let mut out = [0f32; 5];
    assert!(matches!(
        interp.output_f32(0, &mut out),
        Err(InvokeError::LengthMismatch { .. })
    ));
    interp.set_input_i8(0, &[0; 490]).unwrap();
    interp.invoke().unwrap();
}

#[test]
fn float_and_hybrid_models_run_and_agree_with_int8_on_kws() {
    let (Some(int8), Some(hybrid), Some(dir)) = (
        artifact("kws_ref_model.tflite"),
        artifact("kws_ref_model_float32.tflite"),
        common::testdata(),
    ) else {
        return;
    };
    let (_, kws_in) = read_npz_i8(&dir.join("golden/kws_ref_model.npz"), "input").unwrap();
    let mi = Model::load(int8.as_slice()).unwrap();
    let mh = Model::load(hybrid.as_slice()).unwrap();
    let mut ai = AlignedBytes::zeroed(mi.arena_bytes());
    let mut ah = AlignedBytes::zeroed(mh.arena_bytes());
    let mut ii = Interpreter::new(mi, ai.as_mut_slice()).unwrap();
    let mut ih = Interpreter::new(mh, ah.as_mut_slice()).unwrap();
    let q = ii.input_info(0).unwrap().quant.unwrap();
    let n = 200;
    let mut agree = 0;
    for s in 0..n {
        let x = &kws_in[s * 490..(s + 1) * 490];
        ii.set_input_i8(0, x).unwrap();
        let real: Vec<f32> = x
            .iter()
            .map(|&v| q.scale * (v as i32 - q.zero_point) as f32)
            .collect();
        ih.set_input_f32(0, &real).unwrap();
        ii.invoke().unwrap();
        ih.invoke().unwrap();
        let mut pi = [0f32; 12];
        let mut ph = [0f32; 12];
        ii.output_f32(0, &mut pi).unwrap();
        ih.output_f32(0, &mut ph).unwrap();
        let argmax = |p: &[f32; 12]| (0..12).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        agree += usize::from(argmax(&pi) == argmax(&ph));
    }
    assert!(
        agree * 100 >= n * 90,
        "hybrid and int8 KWS agree on only {agree} of {n} samples"
    );
}
