use kiln::npy::{read_labels, read_real, Array};
use kiln::quantize::{calibrate::calibrate, quantize_graph, OpPrecision, QuantizeOptions};
use std::path::Path;

fn split(x: &Array, at: usize) -> (Array, Array) {
    let Array::F32 { shape, data } = x else {
        panic!()
    };
    let per: usize = shape[1..].iter().product();
    let mut s1 = shape.clone();
    s1[0] = at;
    let mut s2 = shape.clone();
    s2[0] = shape[0] - at;
    (
        Array::F32 {
            shape: s1,
            data: data[..at * per].to_vec(),
        },
        Array::F32 {
            shape: s2,
            data: data[at * per..].to_vec(),
        },
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, data, scale, est) = (
        &args[1],
        &args[2],
        args[3].parse::<f32>()?,
        args[4].parse().map_err(anyhow::Error::msg)?,
    );
    let mut g = kiln::import::tflite::import_tflite(&std::fs::read(model)?)?;
    g = kiln::lower::normalize(&g)?;
    kiln::passes::fuse_activations(&mut g);
    let x = read_real(Path::new(data), None, Some(scale))?;
    let y = read_labels(Path::new(data))?;
    let n = x.shape()[0];
    let (cal, test) = split(&x, n / 2);
    let t0 = std::time::Instant::now();
    let calib = calibrate(&g, &cal, |_, _| {})?;
    if std::env::var("DBG").is_ok() {
        for (id, st) in calib.tensors.iter().enumerate() {
            if let Some(st) = st {
                eprintln!(
                    "{:<60} minmax ({:.3},{:.3}) entropy {:?} p99.99 {:?}",
                    &g.tensors[id].name.chars().take(60).collect::<String>(),
                    st.min,
                    st.max,
                    kiln::quantize::ranges::estimate(
                        st,
                        kiln::quantize::ranges::Estimator::Entropy
                    ),
                    kiln::quantize::ranges::estimate(
                        st,
                        kiln::quantize::ranges::Estimator::Percentile(99.99)
                    )
                );
            }
        }
    }
    let opts = QuantizeOptions {
        estimator: est,
        ..Default::default()
    };
    let q = quantize_graph(&g, &calib, &vec![OpPrecision::Int8; g.ops.len()], &opts)?;
    let qa = kiln::convert::assemble_graph(&q, "q")?;
    eprintln!("quantize took {:?}", t0.elapsed());
    let fa = kiln::convert::assemble_graph(&g, "f")?;
    let (fo, per) = kiln::eval::run_real(&fa, &test, |_, _| {})?;
    let (qo, _) = kiln::eval::run_real(&qa, &test, |_, _| {})?;
    let yt = &y[n / 2..];
    println!(
        "float top1 {:.4} int8 top1 {:.4} agree {:.4} sqnr {:.1} dB",
        kiln::eval::top1(&fo, per, yt),
        kiln::eval::top1(&qo, per, yt),
        kiln::eval::agreement(&fo, &qo, per),
        kiln::eval::sqnr_db(&fo, &qo)
    );
    Ok(())
}
