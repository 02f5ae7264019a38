//! End to end for the ONNX-era ops (SUB, DIV, TRANSPOSE, LEAKY_RELU, HARD_SIGMOID, HARD_SWISH,
//! CLAMP, PRELU and the int8 LUT they lower to): host IR → `kiln::lower::lower` → artifact →
//! `Model::load` → `Interpreter`, in f32, f16 and int8 where supported, against references
//! computed here. Then `Model::load` refusing malformed parameters of the new ops.
//!
//! Everything is built in code with a fixed pseudo-random generator; no test data is needed.

use kiln::artifact::AlignedBytes;
use kiln::ir;
use kiln::lower::{lower, to_fp16, Lowered};
use kiln_runtime::graph::{
    Activation, BinaryParams, ClampI8, DType, GraphHeader, OpDef, OpKind, UnaryFn,
};
use kiln_runtime::kernels::quantize::add_params;
use kiln_runtime::{Interpreter, Model, ModelError};

// ---------------------------------------------------------------------------------------------
// Graphs, artifacts, running.

/// xorshift64*, so every run sees the same data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[lo, hi)`.
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn f32s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| (self.next() >> 56) as u8 as i8).collect()
    }
}

fn quant(scale: f32, zero_point: i64) -> Option<ir::QuantInfo> {
    Some(ir::QuantInfo {
        scales: vec![scale],
        zero_points: vec![zero_point],
        axis: 0,
    })
}

/// An activation tensor.
fn act(name: &str, dtype: DType, shape: &[usize], q: Option<ir::QuantInfo>) -> ir::Tensor {
    ir::Tensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: None,
        quant: q,
    }
}

/// A constant tensor.
fn constant(
    name: &str,
    dtype: DType,
    shape: &[usize],
    data: Vec<u8>,
    q: Option<ir::QuantInfo>,
) -> ir::Tensor {
    ir::Tensor {
        data: Some(data),
        ..act(name, dtype, shape, q)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i8_bytes(v: &[i8]) -> Vec<u8> {
    v.iter().map(|&x| x as u8).collect()
}

/// One op from the graph inputs (tensors `inputs`) to tensor `output`, the only graph output.
fn one_op(
    kind: ir::OpKind,
    tensors: Vec<ir::Tensor>,
    op_inputs: &[usize],
    graph_inputs: &[usize],
    output: usize,
) -> ir::Graph {
    ir::Graph {
        name: "new_ops".into(),
        tensors,
        ops: vec![ir::Op {
            kind,
            inputs: op_inputs.iter().map(|&i| Some(i)).collect(),
            outputs: vec![output],
        }],
        inputs: graph_inputs.to_vec(),
        outputs: vec![output],
    }
}

/// Element-wise op: tensor 0 (input) → tensor 1 (output).
fn unary_graph(
    kind: ir::OpKind,
    dtype: DType,
    in_shape: &[usize],
    out_shape: &[usize],
    q_in: Option<ir::QuantInfo>,
    q_out: Option<ir::QuantInfo>,
) -> ir::Graph {
    one_op(
        kind,
        vec![
            act("x", dtype, in_shape, q_in),
            act("y", dtype, out_shape, q_out),
        ],
        &[0],
        &[0],
        1,
    )
}

/// Binary op on two graph inputs: tensors 0 and 1 → tensor 2.
fn binary_graph(
    kind: ir::OpKind,
    dtype: DType,
    shapes: [&[usize]; 3],
    quants: [Option<ir::QuantInfo>; 3],
) -> ir::Graph {
    let [qa, qb, qo] = quants;
    one_op(
        kind,
        vec![
            act("a", dtype, shapes[0], qa),
            act("b", dtype, shapes[1], qb),
            act("out", dtype, shapes[2], qo),
        ],
        &[0, 1],
        &[0, 1],
        2,
    )
}

fn artifact_of(l: &Lowered) -> Vec<u8> {
    kiln::convert::assemble_lowered(l, "new_ops", &serde_json::json!({})).unwrap()
}

/// Input or output values: real values for float tensors, raw values for int8 ones.
#[derive(Clone, Debug, PartialEq)]
enum Data {
    F(Vec<f32>),
    Q(Vec<i8>),
}

impl Data {
    fn f(&self) -> &[f32] {
        match self {
            Data::F(v) => v,
            Data::Q(_) => panic!("expected float data"),
        }
    }
    fn q(&self) -> &[i8] {
        match self {
            Data::Q(v) => v,
            Data::F(_) => panic!("expected int8 data"),
        }
    }
}

/// Lowers, writes, loads and runs `g` on `inputs`; returns graph output 0.
#[track_caller]
fn run(g: &ir::Graph, inputs: &[Data]) -> Data {
    let lowered = lower(g).expect("lower");
    let bytes = AlignedBytes::new(&artifact_of(&lowered));
    let model = Model::load(bytes.as_slice()).expect("load");
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut it = Interpreter::new(model, arena.as_mut_slice()).unwrap();
    for (i, d) in inputs.iter().enumerate() {
        match d {
            Data::F(v) => it.set_input_f32(i, v).unwrap(),
            Data::Q(v) => it.set_input_i8(i, v).unwrap(),
        }
    }
    it.invoke().expect("invoke");
    let info = it.output_info(0).unwrap();
    if info.dtype == DType::I8 {
        Data::Q(it.output_i8(0).unwrap().to_vec())
    } else {
        let n = info.shape.iter().map(|&d| d as usize).product();
        let mut out = vec![0f32; n];
        it.output_f32(0, &mut out).unwrap();
        Data::F(out)
    }
}

/// The lowered op kinds of `g`.
fn lowered_ops(g: &ir::Graph) -> Vec<OpDef> {
    decode(&lower(g).expect("lower").graph).1
}

// ---------------------------------------------------------------------------------------------
// References.

/// Index into `shape` (right-aligned against `out`) of the element broadcast to output
/// multi-index `oi`.
fn src_index(shape: &[usize], out: &[usize], oi: &[usize]) -> usize {
    let off = out.len() - shape.len();
    shape.iter().enumerate().fold(0, |idx, (d, &n)| {
        idx * n + if n == 1 { 0 } else { oi[off + d] }
    })
}

/// `(a_index, b_index)` of every output element, in output order.
fn broadcast_pairs(a: &[usize], b: &[usize], out: &[usize]) -> Vec<(usize, usize)> {
    let total: usize = out.iter().product();
    let mut oi = vec![0usize; out.len()];
    (0..total)
        .map(|flat| {
            let mut rem = flat;
            for d in (0..out.len()).rev() {
                oi[d] = rem % out[d];
                rem /= out[d];
            }
            (src_index(a, out, &oi), src_index(b, out, &oi))
        })
        .collect()
}

fn apply_act(v: f64, a: Activation) -> f64 {
    match a {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::ReluN1To1 => v.clamp(-1.0, 1.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// Rounds to f16 and back (the values an f16 model actually sees).
fn via_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], rel: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= rel * w.abs() + abs,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// f32 results: one f32 rounding of each operand-sized intermediate (1e-5 relative).
const F32_REL: f64 = 1e-5;
/// f16 results: the f32 result rounded once to f16 (2^-11 relative), plus the f32 error.
const F16_REL: f64 = 1.0 / 2048.0 + 1e-5;
/// f16 absolute slack near zero (half the smallest f16 subnormal step, with room).
const F16_ABS: f64 = 1e-7;

/// Half away from zero.
fn round_away(v: f64) -> f64 {
    if v >= 0.0 {
        (v + 0.5).floor()
    } else {
        -((-v + 0.5).floor())
    }
}

/// gemmlowp `SaturatingRoundingDoublingHighMul` without its single saturating case:
/// `round(a * b / 2^31)`, ties toward +infinity.
fn high_mul(a: i64, b: i64) -> i64 {
    (a * b + (1i64 << 30)).div_euclid(1i64 << 31)
}

/// `RoundingDivideByPOT`: `v / 2^e` to nearest, ties away from zero.
fn div_pot(v: i64, e: i32) -> i64 {
    let d = 1i64 << e;
    let (q, r) = (v.div_euclid(d), v.rem_euclid(d));
    if 2 * r > d || (2 * r == d && v >= 0) {
        q + 1
    } else {
        q
    }
}

/// TFLM's reference int8 SUB on one pair, in i64.
fn sub_spec(p: &BinaryParams, zp: [i32; 3], x: i8, y: i8) -> i8 {
    let smaller = |v: i64, m: i32, s: i32| div_pot(high_mul(v, m as i64), -s);
    let x = smaller(
        (x as i64 - zp[0] as i64) << p.left_shift,
        p.input0.multiplier,
        p.input0.shift,
    );
    let y = smaller(
        (y as i64 - zp[1] as i64) << p.left_shift,
        p.input1.multiplier,
        p.input1.shift,
    );
    let v = smaller(x - y, p.output.multiplier, p.output.shift) + zp[2] as i64;
    v.clamp(p.clamp.min as i64, p.clamp.max as i64) as i8
}

/// The int8 value the LUT must hold for real function `f`: `f(s_in (q - zp_in))` quantized with
/// an f32 division and rounding half away from zero.
fn quantized_f(
    f: impl Fn(f64) -> f64,
    q: i8,
    (s_in, zp_in): (f32, i32),
    (s_out, zp_out): (f32, i32),
) -> i8 {
    let y = f(s_in as f64 * (q as i32 - zp_in) as f64) as f32;
    (round_away((y / s_out) as f64) + zp_out as f64).clamp(-128.0, 127.0) as i8
}

fn all_i8() -> Vec<i8> {
    (-128..=127).map(|v| v as i8).collect()
}

// ---------------------------------------------------------------------------------------------
// SUB and DIV.

const BROADCASTS: [[&[usize]; 3]; 5] = [
    [&[2, 3, 4], &[2, 3, 4], &[2, 3, 4]],
    [&[2, 3, 4], &[3, 1], &[2, 3, 4]],
    [&[4], &[2, 3, 4], &[2, 3, 4]],
    [&[2, 1, 4], &[1, 3, 1], &[2, 3, 4]],
    [
        &[1, 2, 1, 3, 1, 2],
        &[2, 1, 2, 1, 2, 1],
        &[2, 2, 2, 3, 2, 2],
    ],
];

#[test]
fn sub_and_div_float_with_broadcasting() {
    let mut rng = Rng::new(1);
    for (case, shapes) in BROADCASTS.iter().enumerate() {
        for activation in [Activation::None, Activation::Relu6] {
            let (na, nb) = (
                shapes[0].iter().product::<usize>(),
                shapes[1].iter().product::<usize>(),
            );
            let a = rng.f32s(na, -10.0, 10.0);
            // Divisors away from zero.
            let b: Vec<f32> = rng
                .f32s(nb, -10.0, 10.0)
                .into_iter()
                .map(|v| if v.abs() < 0.01 { 0.5 } else { v })
                .collect();
            let pairs = broadcast_pairs(shapes[0], shapes[1], shapes[2]);
            for div in [false, true] {
                let kind = if div {
                    ir::OpKind::Div { activation }
                } else {
                    ir::OpKind::Sub { activation }
                };
                let op = |x: f64, y: f64| apply_act(if div { x / y } else { x - y }, activation);
                let g = binary_graph(kind, DType::F32, *shapes, [None, None, None]);
                let got = run(&g, &[Data::F(a.clone()), Data::F(b.clone())]);
                let want: Vec<f64> = pairs
                    .iter()
                    .map(|&(i, j)| op(a[i] as f64, b[j] as f64))
                    .collect();
                let what = format!(
                    "{} case {case} {activation:?}",
                    if div { "DIV" } else { "SUB" }
                );
                // SUB: one rounding of a difference of operands up to 10: 2e-6 absolute covers
                // a cancelling result.
                assert_close(got.f(), &want, F32_REL, 2e-6, &what);

                // f16: the same graph stored in f16, on the f16-rounded inputs.
                let g16 = to_fp16(&g).unwrap();
                let (ah, bh) = (via_f16(&a), via_f16(&b));
                let got = run(&g16, &[Data::F(a.clone()), Data::F(b.clone())]);
                let want: Vec<f64> = pairs
                    .iter()
                    .map(|&(i, j)| op(ah[i] as f64, bh[j] as f64))
                    .collect();
                assert_close(got.f(), &want, F16_REL, 2e-6, &format!("{what} f16"));
            }
        }
    }
}

#[test]
fn sub_with_a_constant_operand() {
    // x - c with c a constant broadcast over the channels, f32.
    let c = [0.5f32, -1.25, 3.0];
    let g = one_op(
        ir::OpKind::Sub {
            activation: Activation::None,
        },
        vec![
            act("x", DType::F32, &[1, 2, 2, 3], None),
            constant("c", DType::F32, &[3], f32_bytes(&c), None),
            act("y", DType::F32, &[1, 2, 2, 3], None),
        ],
        &[0, 1],
        &[0],
        2,
    );
    let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.75 - 4.0).collect();
    let got = run(&g, &[Data::F(x.clone())]);
    let want: Vec<f64> = (0..12).map(|i| x[i] as f64 - c[i % 3] as f64).collect();
    assert_close(got.f(), &want, 0.0, 0.0, "SUB const");
}

#[test]
fn sub_int8_matches_tflm_and_real() {
    let mut rng = Rng::new(2);
    let quants: [[(f32, i32); 3]; 5] = [
        [(0.05, -3), (0.02, 100), (0.07, -128)],
        [(0.1, 0), (0.1, 0), (0.1, 0)],
        [(0.01, -128), (0.2, 127), (0.05, 127)],
        [(0.3, 127), (0.004, -128), (0.02, -128)],
        [(0.5, 10), (0.5, -10), (0.01, 0)],
    ];
    for (qcase, q) in quants.iter().enumerate() {
        for shapes in &BROADCASTS {
            for activation in [Activation::None, Activation::Relu] {
                let g = binary_graph(
                    ir::OpKind::Sub { activation },
                    DType::I8,
                    *shapes,
                    q.map(|(s, z)| quant(s, z as i64)),
                );
                // The lowering prepares SUB exactly as TFLM's ADD/SUB prepare.
                let clamp =
                    kiln_runtime::kernels::quantize::activation_clamp(activation, q[2].0, q[2].1);
                let mut p = add_params(q[0].0, q[1].0, q[2].0, clamp);
                p.activation = activation;
                assert_eq!(lowered_ops(&g)[0].kind, OpKind::Sub(p));
                let a = rng.i8s(shapes[0].iter().product());
                let b = rng.i8s(shapes[1].iter().product());
                let got = run(&g, &[Data::Q(a.clone()), Data::Q(b.clone())]);
                let zp = [q[0].1, q[1].1, q[2].1];
                for (o, &(i, j)) in broadcast_pairs(shapes[0], shapes[1], shapes[2])
                    .iter()
                    .enumerate()
                {
                    let out = got.q()[o];
                    assert_eq!(
                        out,
                        sub_spec(&p, zp, a[i], b[j]),
                        "quant case {qcase} at {o}"
                    );
                    let real = (q[0].0 as f64 * (a[i] as i32 - zp[0]) as f64
                        - q[1].0 as f64 * (b[j] as i32 - zp[1]) as f64)
                        / q[2].0 as f64
                        + zp[2] as f64;
                    let real = real.clamp(clamp.min as f64, clamp.max as f64);
                    assert!(
                        (out as f64 - real).abs() <= 1.0,
                        "quant case {qcase} at {o}: {out} vs real {real}"
                    );
                }
            }
        }
    }
}

#[test]
fn int8_div_is_a_lowering_error() {
    let g = binary_graph(
        ir::OpKind::Div {
            activation: Activation::None,
        },
        DType::I8,
        [&[4], &[4], &[4]],
        [quant(0.1, 0), quant(0.1, 0), quant(0.1, 0)],
    );
    let err = lower(&g).unwrap_err().to_string();
    assert!(
        err.contains("int8 DIV is not supported; keep this op in float"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// TRANSPOSE.

/// The definition: output multi-index `o` reads input multi-index `i` with `i[perm[d]] = o[d]`.
fn transpose_ref<T: Copy>(shape: &[usize], perm: &[usize], x: &[T]) -> Vec<T> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let total: usize = shape.iter().product();
    let mut oi = vec![0; shape.len()];
    let mut ii = vec![0; shape.len()];
    (0..total)
        .map(|flat| {
            let mut rem = flat;
            for d in (0..shape.len()).rev() {
                oi[d] = rem % out_shape[d];
                rem /= out_shape[d];
            }
            for d in 0..shape.len() {
                ii[perm[d]] = oi[d];
            }
            x[ii.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)]
        })
        .collect()
}

/// Every permutation of `0..n` (n <= 4), or a selection for larger ranks.
fn perms(n: usize) -> Vec<Vec<usize>> {
    fn all(prefix: &mut Vec<usize>, n: usize, out: &mut Vec<Vec<usize>>) {
        if prefix.len() == n {
            out.push(prefix.clone());
            return;
        }
        for v in 0..n {
            if !prefix.contains(&v) {
                prefix.push(v);
                all(prefix, n, out);
                prefix.pop();
            }
        }
    }
    if n <= 4 {
        let mut out = Vec::new();
        all(&mut Vec::new(), n, &mut out);
        out
    } else {
        let mut rng = Rng::new(n as u64);
        let mut out = vec![(0..n).collect::<Vec<_>>(), (0..n).rev().collect()];
        // Rotations and random shuffles.
        out.push((1..n).chain([0]).collect());
        for _ in 0..6 {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                p.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            out.push(p);
        }
        out
    }
}

#[test]
fn transpose_all_ranks_and_types() {
    let mut rng = Rng::new(3);
    for rank in 1..=6 {
        // Extents 1..=3 (rank 6 kept small), with a size-1 dimension in some shapes.
        let shape: Vec<usize> = (0..rank)
            .map(|d| {
                if rank >= 3 && d == 1 {
                    1
                } else {
                    2 + (d + rank) % 2
                }
            })
            .collect();
        let n: usize = shape.iter().product();
        for perm in perms(rank) {
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let kind = ir::OpKind::Transpose { perm: perm.clone() };
            // f32 (exact), and f16 (exact on f16-representable values).
            let x = rng.f32s(n, -100.0, 100.0);
            let g = unary_graph(kind.clone(), DType::F32, &shape, &out_shape, None, None);
            let got = run(&g, &[Data::F(x.clone())]);
            assert_eq!(
                got.f(),
                transpose_ref(&shape, &perm, &x),
                "{shape:?} {perm:?}"
            );
            let xh = via_f16(&x);
            let got = run(&to_fp16(&g).unwrap(), &[Data::F(xh.clone())]);
            assert_eq!(
                got.f(),
                transpose_ref(&shape, &perm, &xh),
                "f16 {shape:?} {perm:?}"
            );
            // int8, identical quantization in and out.
            let q = rng.i8s(n);
            let g = unary_graph(
                kind,
                DType::I8,
                &shape,
                &out_shape,
                quant(0.02, -7),
                quant(0.02, -7),
            );
            let got = run(&g, &[Data::Q(q.clone())]);
            assert_eq!(
                got.q(),
                transpose_ref(&shape, &perm, &q),
                "int8 {shape:?} {perm:?}"
            );
        }
    }
}

#[test]
fn transpose_lowering_errors() {
    let bad_perm = unary_graph(
        ir::OpKind::Transpose { perm: vec![0, 0] },
        DType::F32,
        &[2, 3],
        &[2, 3],
        None,
        None,
    );
    let err = lower(&bad_perm).unwrap_err().to_string();
    assert!(err.contains("not a permutation"), "{err}");
    let bad_shape = unary_graph(
        ir::OpKind::Transpose { perm: vec![1, 0] },
        DType::F32,
        &[2, 3],
        &[2, 3],
        None,
        None,
    );
    let err = lower(&bad_shape).unwrap_err().to_string();
    assert!(err.contains("permuted"), "{err}");
    let requant = unary_graph(
        ir::OpKind::Transpose { perm: vec![1, 0] },
        DType::I8,
        &[2, 3],
        &[3, 2],
        quant(0.1, 0),
        quant(0.2, 0),
    );
    let err = lower(&requant).unwrap_err().to_string();
    assert!(err.contains("same quantization"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// LEAKY_RELU, HARD_SIGMOID, HARD_SWISH, CLAMP.

/// Each float function with its IR op and an f64 reference written from its definition.
/// A real function of one variable.
type RealFn = Box<dyn Fn(f64) -> f64>;

fn unary_cases() -> Vec<(ir::OpKind, RealFn)> {
    vec![
        (
            ir::OpKind::LeakyRelu { alpha: 0.1 },
            Box::new(|x: f64| if x >= 0.0 { x } else { 0.1f32 as f64 * x }),
        ),
        (
            ir::OpKind::LeakyRelu { alpha: -0.7 },
            Box::new(|x: f64| if x >= 0.0 { x } else { -0.7f32 as f64 * x }),
        ),
        (
            ir::OpKind::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Box::new(|x: f64| (0.2f32 as f64 * x + 0.5).clamp(0.0, 1.0)),
        ),
        (
            ir::OpKind::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            },
            Box::new(|x: f64| ((1.0f32 / 6.0) as f64 * x + 0.5).clamp(0.0, 1.0)),
        ),
        (
            ir::OpKind::HardSwish,
            Box::new(|x: f64| x * (x + 3.0).clamp(0.0, 6.0) / 6.0),
        ),
        (
            ir::OpKind::Clamp {
                min: -1.5,
                max: 2.25,
            },
            Box::new(|x: f64| x.clamp(-1.5, 2.25)),
        ),
        (
            ir::OpKind::Clamp { min: 0.5, max: 0.5 },
            Box::new(|_: f64| 0.5),
        ),
    ]
}

#[test]
fn unary_float_f32_and_f16() {
    let mut rng = Rng::new(4);
    let shape = [2, 3, 5, 4];
    let n = 120;
    for (kind, f) in unary_cases() {
        let mut x = rng.f32s(n, -8.0, 8.0);
        x[..8].copy_from_slice(&[-3.0, 3.0, 0.0, -0.0, -1.5, 2.25, 0.5, -6.0]);
        let g = unary_graph(kind.clone(), DType::F32, &shape, &shape, None, None);
        assert!(matches!(lowered_ops(&g)[0].kind, OpKind::UnaryFloat(_)));
        let got = run(&g, &[Data::F(x.clone())]);
        let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
        // HARD_SIGMOID's alpha * x + beta may cancel: 3e-7 absolute.
        assert_close(got.f(), &want, F32_REL, 3e-7, &format!("{kind:?}"));
        let xh = via_f16(&x);
        let got = run(&to_fp16(&g).unwrap(), &[Data::F(x.clone())]);
        let want: Vec<f64> = xh.iter().map(|&v| f(v as f64)).collect();
        assert_close(
            got.f(),
            &want,
            F16_REL,
            3e-7 + F16_ABS,
            &format!("{kind:?} f16"),
        );
    }
}

#[test]
fn unary_int8_is_a_lut_of_the_real_function() {
    let quants: [((f32, i32), (f32, i32)); 5] = [
        ((0.05, 0), (0.05, 0)),
        ((0.1, -128), (0.02, 127)),
        ((0.03, 127), (0.1, -128)),
        ((0.2, 5), (0.01, -20)),
        ((0.5, -100), (0.25, 100)),
    ];
    for (kind, f) in unary_cases() {
        for &(qi, qo) in &quants {
            let g = unary_graph(
                kind.clone(),
                DType::I8,
                &[4, 64],
                &[4, 64],
                quant(qi.0, qi.1 as i64),
                quant(qo.0, qo.1 as i64),
            );
            assert!(matches!(lowered_ops(&g)[0].kind, OpKind::Lut(_)));
            let x = all_i8();
            let got = run(&g, &[Data::Q(x.clone())]);
            for (&q, &o) in x.iter().zip(got.q()) {
                assert_eq!(
                    o,
                    quantized_f(&f, q, qi, qo),
                    "{kind:?} {qi:?} {qo:?} q={q}"
                );
                let real = (f(qi.0 as f64 * (q as i32 - qi.1) as f64) / qo.0 as f64 + qo.1 as f64)
                    .clamp(-128.0, 127.0);
                assert!(
                    (o as f64 - real).abs() <= 0.5 + 1e-4,
                    "{kind:?} q={q}: {o} vs real {real}"
                );
            }
        }
    }
}

#[test]
fn unary_lowering_errors() {
    let g = |kind| unary_graph(kind, DType::F32, &[3], &[3], None, None);
    let err = lower(&g(ir::OpKind::Clamp { min: 2.0, max: 1.0 }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("above max"), "{err}");
    let err = lower(&g(ir::OpKind::LeakyRelu { alpha: f32::NAN }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("finite"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// PRELU.

#[test]
fn prelu_float_constant_and_arena_slopes() {
    let mut rng = Rng::new(5);
    let x_shape = [1, 3, 4, 5];
    let n = 60;
    // Slopes broadcast over the channels, over H×W×C, or as a scalar.
    for slope_shape in [&[5usize][..], &[3, 1, 5], &[1], &[1, 3, 4, 5]] {
        let ns: usize = slope_shape.iter().product();
        let slope = rng.f32s(ns, -1.0, 1.0);
        let x = rng.f32s(n, -5.0, 5.0);
        let pairs = broadcast_pairs(&x_shape, slope_shape, &x_shape);
        let prelu = |xs: &[f32], ss: &[f32]| -> Vec<f64> {
            pairs
                .iter()
                .map(|&(i, j)| {
                    let v = xs[i] as f64;
                    if v < 0.0 {
                        ss[j] as f64 * v
                    } else {
                        v
                    }
                })
                .collect()
        };
        // Constant slope.
        let g = one_op(
            ir::OpKind::PRelu,
            vec![
                act("x", DType::F32, &x_shape, None),
                constant("slope", DType::F32, slope_shape, f32_bytes(&slope), None),
                act("y", DType::F32, &x_shape, None),
            ],
            &[0, 1],
            &[0],
            2,
        );
        let got = run(&g, &[Data::F(x.clone())]);
        assert_close(got.f(), &prelu(&x, &slope), F32_REL, 0.0, "PRELU const");
        let got = run(&to_fp16(&g).unwrap(), &[Data::F(x.clone())]);
        assert_close(
            got.f(),
            &prelu(&via_f16(&x), &via_f16(&slope)),
            F16_REL,
            F16_ABS,
            "PRELU const f16",
        );
        // Slope computed at run time (a second graph input).
        let g = binary_graph(
            ir::OpKind::PRelu,
            DType::F32,
            [&x_shape, slope_shape, &x_shape],
            [None, None, None],
        );
        let got = run(&g, &[Data::F(x.clone()), Data::F(slope.clone())]);
        assert_close(got.f(), &prelu(&x, &slope), F32_REL, 0.0, "PRELU arena");
    }
}

#[test]
fn prelu_int8_scalar_slope_is_a_lut() {
    for (alpha_q, (s_alpha, zp_alpha)) in [
        (-50i8, (0.01f32, 0i64)),
        (100, (0.004, -128)),
        (3, (0.3, 0)),
    ] {
        let (qi, qo) = ((0.05f32, -20i32), (0.04f32, 30i32));
        let g = one_op(
            ir::OpKind::PRelu,
            vec![
                act("x", DType::I8, &[2, 4, 32], quant(qi.0, qi.1 as i64)),
                constant(
                    "slope",
                    DType::I8,
                    &[1],
                    i8_bytes(&[alpha_q]),
                    quant(s_alpha, zp_alpha),
                ),
                act("y", DType::I8, &[2, 4, 32], quant(qo.0, qo.1 as i64)),
            ],
            &[0, 1],
            &[0],
            2,
        );
        let ops = lowered_ops(&g);
        assert!(matches!(ops[0].kind, OpKind::Lut(_)));
        assert_eq!(ops[0].inputs.len(), 1, "the slope is folded into the table");
        let alpha = s_alpha as f64 * (alpha_q as i64 - zp_alpha) as f64;
        let f = |x: f64| if x < 0.0 { alpha * x } else { x };
        let x = all_i8();
        let got = run(&g, &[Data::Q(x.clone())]);
        for (&q, &o) in x.iter().zip(got.q()) {
            assert_eq!(o, quantized_f(f, q, qi, qo), "alpha {alpha} q={q}");
        }
    }
}

#[test]
fn prelu_int8_per_channel_slope_is_a_lowering_error() {
    let g = one_op(
        ir::OpKind::PRelu,
        vec![
            act("x", DType::I8, &[1, 2, 2, 3], quant(0.05, 0)),
            constant(
                "slope",
                DType::I8,
                &[3],
                i8_bytes(&[10, 20, 30]),
                quant(0.01, 0),
            ),
            act("y", DType::I8, &[1, 2, 2, 3], quant(0.05, 0)),
        ],
        &[0, 1],
        &[0],
        2,
    );
    let err = lower(&g).unwrap_err().to_string();
    assert!(
        err.contains("int8 PRELU with per-channel slopes is not supported yet"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// A chain: TRANSPOSE → HARD_SWISH → SUB (constant) in int8 and f32, so the new ops share an
// arena plan with each other.

#[test]
fn chain_of_new_ops() {
    for int8 in [false, true] {
        let dt = if int8 { DType::I8 } else { DType::F32 };
        let q = |s: f32, z: i64| if int8 { quant(s, z) } else { None };
        let c_data = if int8 {
            i8_bytes(&[10, -20, 30])
        } else {
            f32_bytes(&[0.1, -0.2, 0.3])
        };
        let g = ir::Graph {
            name: "chain".into(),
            tensors: vec![
                act("x", dt, &[1, 3, 2, 4], q(0.05, 3)),
                act("t", dt, &[1, 2, 4, 3], q(0.05, 3)),
                act("h", dt, &[1, 2, 4, 3], q(0.04, -40)),
                constant("c", dt, &[3], c_data, q(0.01, 0)),
                act("y", dt, &[1, 2, 4, 3], q(0.06, 5)),
            ],
            ops: vec![
                ir::Op {
                    kind: ir::OpKind::Transpose {
                        perm: vec![0, 2, 3, 1],
                    },
                    inputs: vec![Some(0)],
                    outputs: vec![1],
                },
                ir::Op {
                    kind: ir::OpKind::HardSwish,
                    inputs: vec![Some(1)],
                    outputs: vec![2],
                },
                ir::Op {
                    kind: ir::OpKind::Sub {
                        activation: Activation::None,
                    },
                    inputs: vec![Some(2), Some(3)],
                    outputs: vec![4],
                },
            ],
            inputs: vec![0],
            outputs: vec![4],
        };
        let hswish = |x: f64| x * (x + 3.0).clamp(0.0, 6.0) / 6.0;
        if int8 {
            let x = Rng::new(6).i8s(24);
            let got = run(&g, &[Data::Q(x.clone())]);
            let t = transpose_ref(&[1, 3, 2, 4], &[0, 2, 3, 1], &x);
            let h: Vec<i8> = t
                .iter()
                .map(|&v| quantized_f(hswish, v, (0.05, 3), (0.04, -40)))
                .collect();
            let p = add_params(0.04, 0.01, 0.06, ClampI8::default());
            let c = [10i8, -20, 30];
            let want: Vec<i8> = (0..24)
                .map(|i| sub_spec(&p, [-40, 0, 5], h[i], c[i % 3]))
                .collect();
            assert_eq!(got.q(), want);
        } else {
            let x = Rng::new(6).f32s(24, -5.0, 5.0);
            let got = run(&g, &[Data::F(x.clone())]);
            let t = transpose_ref(&[1, 3, 2, 4], &[0, 2, 3, 1], &x);
            let c = [0.1f32, -0.2, 0.3];
            let want: Vec<f64> = (0..24)
                .map(|i| hswish(t[i] as f64) - c[i % 3] as f64)
                .collect();
            assert_close(got.f(), &want, F32_REL, 1e-6, "chain f32");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model::load refuses malformed parameters of the new ops.

/// Splits GRAPH bytes into (header and tensor table bytes, ops).
fn decode(graph: &[u8]) -> (Vec<u8>, Vec<OpDef>) {
    let (header, rest): (GraphHeader, &[u8]) = postcard::take_from_bytes(graph).unwrap();
    let table_end =
        graph.len() - rest.len() + header.tensor_count as usize * header.tensor_slot as usize;
    let mut rest = &graph[table_end..];
    let mut ops = Vec::new();
    for _ in 0..header.op_count {
        let (op, r): (OpDef, &[u8]) = postcard::take_from_bytes(rest).unwrap();
        ops.push(op);
        rest = r;
    }
    assert!(rest.is_empty());
    (graph[..table_end].to_vec(), ops)
}

/// Lowers `g`, lets `edit` change its op 0, and returns what `Model::load` says.
fn load_edited(g: &ir::Graph, edit: impl FnOnce(&mut OpKind)) -> Result<(), ModelError> {
    let mut lowered = lower(g).expect("lower");
    let (prefix, mut ops) = decode(&lowered.graph);
    edit(&mut ops[0].kind);
    lowered.graph = prefix;
    for op in &ops {
        lowered
            .graph
            .extend_from_slice(&postcard::to_allocvec(op).unwrap());
    }
    let bytes = AlignedBytes::new(&artifact_of(&lowered));
    Model::load(bytes.as_slice()).map(|_| ())
}

#[track_caller]
fn assert_refused(result: Result<(), ModelError>, keyword: &str) {
    match result {
        Err(ModelError::BadOp { reason, .. }) if reason.contains(keyword) => {}
        other => panic!("expected BadOp about `{keyword}`, got {other:?}"),
    }
}

#[test]
fn load_refuses_malformed_new_op_params() {
    // The unedited models load.
    let transpose = unary_graph(
        ir::OpKind::Transpose {
            perm: vec![0, 2, 1],
        },
        DType::F32,
        &[2, 3, 4],
        &[2, 4, 3],
        None,
        None,
    );
    load_edited(&transpose, |_| {}).unwrap();
    // Bad perms: a repeated axis, an axis beyond the rank, and a valid permutation that does
    // not give the output shape.
    for perm in [[0, 0, 1, 0, 0, 0], [0, 3, 1, 0, 0, 0], [0, 1, 7, 0, 0, 0]] {
        assert_refused(
            load_edited(&transpose, |k| {
                *k = OpKind::Transpose(kiln_runtime::graph::TransposeParams { perm })
            }),
            "permutation",
        );
    }
    assert_refused(
        load_edited(&transpose, |k| {
            *k = OpKind::Transpose(kiln_runtime::graph::TransposeParams {
                perm: [2, 1, 0, 0, 0, 0],
            })
        }),
        "permuted",
    );

    // LUT: 255 bytes, and a table outside WEIGHTS.
    let lut = unary_graph(
        ir::OpKind::HardSwish,
        DType::I8,
        &[8],
        &[8],
        quant(0.05, 0),
        quant(0.05, 0),
    );
    load_edited(&lut, |_| {}).unwrap();
    assert_refused(
        load_edited(&lut, |k| {
            if let OpKind::Lut(b) = k {
                b.len = 255;
            }
        }),
        "256",
    );
    assert_refused(
        load_edited(&lut, |k| {
            if let OpKind::Lut(b) = k {
                b.offset = 1 << 20;
            }
        }),
        "outside WEIGHTS",
    );
    // A LUT on float tensors, and a float function on int8 tensors.
    let float = unary_graph(ir::OpKind::HardSwish, DType::F32, &[8], &[8], None, None);
    assert_refused(
        load_edited(&float, |k| {
            *k = OpKind::Lut(kiln_runtime::graph::BufRef {
                offset: 0,
                len: 256,
            })
        }),
        "int8",
    );
    assert_refused(
        load_edited(&lut, |k| *k = OpKind::UnaryFloat(UnaryFn::HardSwish)),
        "f32 or f16",
    );

    // Non-finite parameters and min > max.
    let leaky = unary_graph(
        ir::OpKind::LeakyRelu { alpha: 0.2 },
        DType::F32,
        &[8],
        &[8],
        None,
        None,
    );
    load_edited(&leaky, |_| {}).unwrap();
    for f in [
        UnaryFn::LeakyRelu { alpha: f32::NAN },
        UnaryFn::HardSigmoid {
            alpha: 0.2,
            beta: f32::INFINITY,
        },
        UnaryFn::Clamp {
            min: f32::NAN,
            max: 1.0,
        },
    ] {
        assert_refused(
            load_edited(&leaky, |k| *k = OpKind::UnaryFloat(f)),
            "finite",
        );
    }
    assert_refused(
        load_edited(&leaky, |k| {
            *k = OpKind::UnaryFloat(UnaryFn::Clamp {
                min: 1.0,
                max: -1.0,
            })
        }),
        "min is above max",
    );

    // int8 DIV, and an int8 SUB with out-of-range rescale shifts.
    let sub = binary_graph(
        ir::OpKind::Sub {
            activation: Activation::None,
        },
        DType::I8,
        [&[4], &[4], &[4]],
        [quant(0.1, 0), quant(0.1, 0), quant(0.1, 0)],
    );
    load_edited(&sub, |_| {}).unwrap();
    assert_refused(
        load_edited(&sub, |k| {
            if let OpKind::Sub(p) = *k {
                *k = OpKind::Div(p);
            }
        }),
        "int8 DIV",
    );
    assert_refused(
        load_edited(&sub, |k| {
            if let OpKind::Sub(p) = k {
                p.input1.shift = 1;
            }
        }),
        "shifts",
    );
    // int8 PRELU (it must be lowered to a LUT).
    assert_refused(load_edited(&sub, |k| *k = OpKind::PRelu), "PRELU");

    // PRELU whose slope does not broadcast into x.
    let prelu = binary_graph(
        ir::OpKind::PRelu,
        DType::F32,
        [&[2, 3], &[3], &[2, 3]],
        [None, None, None],
    );
    load_edited(&prelu, |_| {}).unwrap();
    let bad = binary_graph(
        ir::OpKind::PRelu,
        DType::F32,
        [&[2, 3], &[2], &[2, 3]],
        [None, None, None],
    );
    assert_refused(load_edited(&bad, |_| {}), "broadcast");
}
