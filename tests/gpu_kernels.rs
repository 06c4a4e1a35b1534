//! WGSL kernels against the candle CPU path on random inputs, including sizes that are
//! not multiples of a tile. Every test runs twice in CI: natively on whatever GPU wgpu
//! finds (Mesa's lavapipe) under `cargo test`, and in headless Chromium's WebGPU under
//! `wasm-pack test`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use medphi::gpu::{GpuContext, GpuLinear, GpuNorm, GpuTensor, KernelFamily, Kernels, WeightFormat};

/// Declares each async test body as a native `#[test]` and a browser test.
macro_rules! native_and_browser {
    ($($name:ident),* $(,)?) => {
        #[cfg(not(target_arch = "wasm32"))]
        mod native {
            $(#[test]
            fn $name() {
                pollster::block_on(super::$name())
            })*
        }
        #[cfg(target_arch = "wasm32")]
        mod browser {
            wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);
            $(#[wasm_bindgen_test::wasm_bindgen_test]
            async fn $name() {
                super::$name().await
            })*
        }
    };
}

native_and_browser!(
    matmul_with_bias_matches_candle,
    matmul_reads_f16_q8_0_and_q4_0_weights_in_place,
    embedding_gathers_from_quantized_tables,
    layer_norm_matches_candle,
    gelu_new_matches_candle_and_stays_finite_for_large_inputs,
    reports_adapter_limits_and_refuses_oversized_bindings,
    device_errors_become_errors_not_panics,
    embedding_gathers_rows_across_table_chunks,
    residual_matches_a_plain_sum,
    top_k_matches_the_host_selection_with_ties_and_nan,
    rotary_kv_cache_and_attention_match_a_plain_reference,
);

async fn ctx() -> (GpuContext, Kernels) {
    let ctx = GpuContext::new()
        .await
        .expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)");
    let kernels = Kernels::new(&ctx, KernelFamily::Emulator);
    (ctx, kernels)
}

/// The kernel variants that differ between families: the emulator family, the gpu family,
/// and the gpu family without subgroup operations (its workgroup-memory reduction), as an
/// adapter without them would run it.
async fn variants() -> Vec<(String, GpuContext, Kernels)> {
    let mut out = Vec::new();
    for (name, family, subgroups) in [
        ("emulator", KernelFamily::Emulator, true),
        ("gpu", KernelFamily::Gpu, true),
        ("gpu without subgroups", KernelFamily::Gpu, false),
    ] {
        let (mut ctx, _) = ctx().await;
        ctx.info.subgroups &= subgroups;
        let kernels = Kernels::new(&ctx, family);
        out.push((name.to_string(), ctx, kernels));
    }
    out
}

fn rand(shape: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `(x · wᵀ + b)` on the GPU with `w` stored in `format`, against candle on the values those
/// bytes decode to, for each `(m, n, k)`.
async fn check_matmul(format: WeightFormat, sizes: &[(usize, usize, usize)]) {
    for (variant, ctx, k) in variants().await {
        for &(m, n, kk) in sizes {
            let x = rand(&[m, kk], 1.0);
            let (bytes, decoded) = encode(&rand(&[n, kk], 0.05), format);
            assert_eq!(bytes.len(), n * format.row_bytes(kk));
            let b = rand(&[n], 0.1);
            let expected = x
                .matmul(&decoded.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let xb = ctx.upload("x", &values(&x), &[m, kk]).unwrap();
            let linear = GpuLinear {
                w: ctx.upload_bytes("w", &bytes, &[n, kk], format).unwrap(),
                b: Some(ctx.upload("b", &values(&b), &[n]).unwrap()),
            };
            let y = ctx.zeros("y", &[m, n]).unwrap();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let recorded = k.matmul(&ctx, &mut enc, m, &xb, &linear, (&y, 0));
            if variant != "emulator" && kk % 32 != 0 {
                // The gpu kernels read whole 32-value chunks: other row lengths are refused.
                assert!(recorded.unwrap_err().to_string().contains("multiple of 32"));
                continue;
            }
            recorded.unwrap();
            ctx.queue.submit([enc.finish()]);
            let got = ctx.read(&y, m * n).await.unwrap();
            let diff = max_diff(&got, &values(&expected));
            assert!(
                diff < 1e-4,
                "{variant} {format:?} ({m}×{kk})·({n}×{kk})ᵀ: max diff {diff}"
            );
        }
    }
}

async fn matmul_with_bias_matches_candle() {
    let sizes = [
        (1, 19, 37),
        (1, 19, 64),
        (3, 64, 128),
        (17, 33, 50),
        (33, 70, 96),
        (64, 96, 160),
        (1, 1000, 2560),
    ];
    check_matmul(WeightFormat::F32, &sizes).await;
}

/// `w` (n × k) in `format` as the GPU holds it, and the values those bytes decode to.
fn encode(w: &Tensor, format: WeightFormat) -> (Vec<u8>, Tensor) {
    let ggml = match format {
        WeightFormat::F32 => return (bytemuck::cast_slice(&values(w)).to_vec(), w.clone()),
        WeightFormat::F16 => GgmlDType::F16,
        WeightFormat::Q8_0 => GgmlDType::Q8_0,
        WeightFormat::Q4_0 => GgmlDType::Q4_0,
    };
    let q = QTensor::quantize(w, ggml).unwrap();
    (
        q.data().unwrap().into_owned(),
        q.dequantize(&Device::Cpu).unwrap(),
    )
}

async fn matmul_reads_f16_q8_0_and_q4_0_weights_in_place() {
    // GEMV (m = 1) and tiled GEMM, output counts that are not tile multiples, and Phi-2's
    // k = 2560 (80 blocks a row); k is whole blocks of 32.
    let sizes = [
        (1, 19, 64),
        (1, 300, 2560),
        (5, 33, 96),
        (17, 70, 2560),
        (40, 65, 2560),
    ];
    for format in [WeightFormat::F16, WeightFormat::Q8_0, WeightFormat::Q4_0] {
        check_matmul(format, &sizes).await;
    }
}

async fn embedding_gathers_from_quantized_tables() {
    let (ctx, k) = ctx().await;
    let (rows, dim) = (40, 64);
    let ids = [3u32, 0, 39, 3, 17];
    for format in [WeightFormat::F16, WeightFormat::Q8_0, WeightFormat::Q4_0] {
        let (bytes, decoded) = encode(&rand(&[rows, dim], 1.0), format);
        let expected = decoded
            .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let table = ctx
            .upload_bytes("table", &bytes, &[rows, dim], format)
            .unwrap();
        let out = ctx.zeros("out", &[ids.len(), dim]).unwrap();
        let idb = u32_tensor(&ctx, &ids);
        run(&ctx, |enc| {
            k.embedding(&ctx, enc, ids.len(), &idb, (&table, 0), &out)
                .unwrap()
        });
        let got = ctx.read(&out, ids.len() * dim).await.unwrap();
        assert!(max_diff(&got, &values(&expected)) < 1e-6, "{format:?}");
    }
}

async fn layer_norm_matches_candle() {
    let (ctx, k) = ctx().await;
    for (rows, dim) in [(1, 32), (5, 37), (3, 2560)] {
        // An offset mean checks that the variance is computed around it.
        let x = (rand(&[rows, dim], 2.0) + 3.0).unwrap();
        let g = (rand(&[dim], 0.1) + 1.0).unwrap();
        let b = rand(&[dim], 0.1);
        let expected = candle_nn::ops::layer_norm(&x, &g, &b, 1e-5).unwrap();
        let xb = ctx.upload("x", &values(&x), &[rows, dim]).unwrap();
        let norm = GpuNorm {
            w: ctx.upload("g", &values(&g), &[dim]).unwrap(),
            b: ctx.upload("b", &values(&b), &[dim]).unwrap(),
            eps: 1e-5,
        };
        let y = ctx.zeros("y", &[rows, dim]).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        k.layer_norm(&ctx, &mut enc, rows, &xb, &norm, &y).unwrap();
        ctx.queue.submit([enc.finish()]);
        let got = ctx.read(&y, rows * dim).await.unwrap();
        let diff = max_diff(&got, &values(&expected));
        assert!(diff < 1e-4, "{rows}×{dim}: max diff {diff}");
    }
}

async fn gelu_new_matches_candle_and_stays_finite_for_large_inputs() {
    let (ctx, k) = ctx().await;
    let mut input = values(&rand(&[1001], 3.0));
    input.extend([-1e4, -80.0, -20.0, 20.0, 80.0, 1e4]);
    let x = Tensor::new(input.as_slice(), &Device::Cpu).unwrap();
    let expected = values(&x.gelu().unwrap());
    let buf = ctx.upload("x", &input, &[1, input.len()]).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.gelu_new(&ctx, &mut enc, 1, &buf).unwrap();
    ctx.queue.submit([enc.finish()]);
    let got = ctx.read(&buf, input.len()).await.unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "gelu produced NaN/inf");
    // Relative for the huge inputs (where gelu(x) = x), absolute elsewhere.
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{g} vs {e}");
    }
}

async fn reports_adapter_limits_and_refuses_oversized_bindings() {
    let (ctx, _) = ctx().await;
    assert!(
        ctx.info.max_storage_buffer_binding_size >= 128 << 20,
        "{:?}",
        ctx.info
    );
    let err = ctx
        .check_binding("model.embed_tokens.weight", u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight")
            && err.contains("max_storage_buffer_binding_size"),
        "{err}"
    );
}

async fn device_errors_become_errors_not_panics() {
    let (ctx, k) = ctx().await;
    // Reading back a buffer created without COPY_SRC is a validation error, which wgpu
    // would turn into a panic by default.
    let x = ctx.upload("x", &[1.0; 4], &[1, 4]).unwrap();
    let tiny = GpuTensor {
        buffer: ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tiny"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        }),
        shape: vec![1, 1],
        format: WeightFormat::F32,
    };
    let linear = GpuLinear {
        w: x.clone(),
        b: None,
    };
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.matmul(&ctx, &mut enc, 1, &x, &linear, (&tiny, 0))
        .unwrap();
    ctx.queue.submit([enc.finish()]);
    let err = ctx.read(&tiny, 1).await.unwrap_err().to_string();
    assert!(err.starts_with("GPU:"), "{err}");
}

fn run(ctx: &GpuContext, record: impl FnOnce(&mut wgpu::CommandEncoder)) {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    record(&mut enc);
    ctx.queue.submit([enc.finish()]);
}

/// u32 values (token ids, top-k output) in a tensor of their length.
fn u32_tensor(ctx: &GpuContext, data: &[u32]) -> GpuTensor {
    let bits: Vec<f32> = data.iter().map(|&v| f32::from_bits(v)).collect();
    ctx.upload("u32", &bits, &[data.len()]).unwrap()
}

async fn embedding_gathers_rows_across_table_chunks() {
    let (ctx, k) = ctx().await;
    let (rows, dim) = (50, 7);
    let table = rand(&[rows, dim], 1.0);
    let ids = [3u32, 0, 49, 3, 25, 24];
    let expected = table
        .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
        .unwrap();
    let out = ctx.zeros("out", &[ids.len(), dim]).unwrap();
    let idb = u32_tensor(&ctx, &ids);
    let all = values(&table);
    // The table bound as two row chunks, as for an embedding larger than one binding.
    for (start, count) in [(0usize, 25usize), (25, 25)] {
        let chunk = ctx
            .upload(
                "chunk",
                &all[start * dim..(start + count) * dim],
                &[count, dim],
            )
            .unwrap();
        run(&ctx, |enc| {
            k.embedding(&ctx, enc, ids.len(), &idb, (&chunk, start), &out)
                .unwrap()
        });
    }
    let got = ctx.read(&out, ids.len() * dim).await.unwrap();
    assert_eq!(got, values(&expected));
}

async fn residual_matches_a_plain_sum() {
    let (ctx, k) = ctx().await;
    let n = 70_001;
    let (a, b, c) = (
        values(&rand(&[n], 1.0)),
        values(&rand(&[n], 1.0)),
        values(&rand(&[n], 1.0)),
    );
    let xb = ctx.upload("x", &a, &[1, n]).unwrap();
    let (bb, cb) = (
        ctx.upload("attn", &b, &[1, n]).unwrap(),
        ctx.upload("mlp", &c, &[1, n]).unwrap(),
    );
    run(&ctx, |enc| {
        k.residual(&ctx, enc, 1, (&xb, &bb, &cb)).unwrap()
    });
    let got = ctx.read(&xb, n).await.unwrap();
    let expected: Vec<f32> = (0..n).map(|i| a[i] + b[i] + c[i]).collect();
    assert!(max_diff(&got, &expected) < 1e-6);
}

async fn top_k_matches_the_host_selection_with_ties_and_nan() {
    let (ctx, k) = ctx().await;
    let mut logits = values(&rand(&[51_200], 2.0));
    logits[40_000] = 50.0;
    logits[777] = 50.0; // a tie: the lower id first, so top 1 is torch.argmax
    logits[31] = f32::NAN; // skipped, as the host sampler does
    logits[50_296] = 99.0; // beyond the vocabulary limit
    for i in 0..10 {
        logits[1000 + 37 * i] = 20.0 - (i / 2) as f32; // pairs of equal values
    }
    let lb = ctx.upload("logits", &logits, &[1, logits.len()]).unwrap();
    let out = u32_tensor(&ctx, &[0; 2 * 64 + 1]);
    for (count, temperature) in [(1u32, 1.0f32), (7, 0.7), (64, 1.3)] {
        let kk = count as usize;
        run(&ctx, |enc| {
            let request = (50_295, count, 1.0 / temperature);
            k.top_k(&ctx, enc, request, (&lb, &out)).unwrap()
        });
        let got = ctx.read_as::<u32>(&out, 2 * kk + 1).await.unwrap();
        let want = medphi::candidates::top_k(&logits[..50_295], kk, temperature);
        assert_eq!(got[..kk], want.ids[..], "k = {count}");
        let values: Vec<f32> = got[kk..2 * kk].iter().map(|&b| f32::from_bits(b)).collect();
        assert_eq!(values, want.logits);
        let log_norm = f32::from_bits(got[2 * kk]);
        assert!(
            (log_norm - want.log_norm).abs() < 1e-4,
            "{log_norm} vs {}",
            want.log_norm
        );
    }
    assert_eq!(
        medphi::candidates::top_k(&logits[..50_295], 1, 1.0).ids,
        [medphi::candidates::argmax(&logits[..50_295])]
    );
    // Fewer values than k: the missing candidates are marked.
    run(&ctx, |enc| {
        k.top_k(&ctx, enc, (3, 5, 1.0), (&lb, &out)).unwrap()
    });
    let got = ctx.read_as::<u32>(&out, 5).await.unwrap();
    let want = medphi::candidates::top_k(&logits[..3], 5, 1.0);
    assert_eq!(got[..3], want.ids[..]);
    assert_eq!(got[3..], [u32::MAX, u32::MAX]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    assert!(k.top_k(&ctx, &mut enc, (3, 65, 1.0), (&lb, &out)).is_err());
}

/// Plain-loop reference: NeoX rotary on the first `rd` dims, causal softmax attention.
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    ks: &[Vec<f32>],
    vs: &[Vec<f32>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    rd: usize,
    start: usize,
    theta: f64,
) -> Vec<f32> {
    let rotate = |x: &[f32], pos: usize| -> Vec<f64> {
        let half = rd / 2;
        (0..hd)
            .map(|d| {
                if d >= rd {
                    return f64::from(x[d]);
                }
                let j = d % half;
                let angle = pos as f64 / theta.powf(2.0 * j as f64 / rd as f64);
                let (s, c) = angle.sin_cos();
                if d < half {
                    f64::from(x[d]) * c - f64::from(x[d + half]) * s
                } else {
                    f64::from(x[d]) * c + f64::from(x[d - half]) * s
                }
            })
            .collect()
    };
    let seq = q.len() / (heads * hd);
    let mut out = vec![0f32; q.len()];
    for t in 0..seq {
        let pos = start + t;
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let qr = rotate(&q[(t * heads + h) * hd..][..hd], pos);
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let kr = rotate(&ks[j][kv * hd..][..hd], j);
                    qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..hd {
                let o: f64 = (0..=pos)
                    .map(|j| w[j] * f64::from(vs[j][kv * hd + d]))
                    .sum::<f64>()
                    / sum;
                out[(t * heads + h) * hd + d] = o as f32;
            }
        }
    }
    out
}

async fn rotary_kv_cache_and_attention_match_a_plain_reference() {
    for (variant, ctx, k) in variants().await {
        // Phi-2's head (80 dims, 32 rotary) with grouped kv heads, prefill then decode.
        let (heads, kv_heads, hd, rd, cap, theta) =
            (4usize, 2usize, 80usize, 32usize, 600usize, 10_000f64);
        let half = rd / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..cap)
            .flat_map(|p| (0..half).map(move |j| (p, j)))
            .map(|(p, j)| {
                let inv = 1.0 / theta.powf(2.0 * j as f64 / rd as f64) as f32;
                let a = p as f32 * inv;
                (a.cos(), a.sin())
            })
            .unzip();
        let (cos_b, sin_b) = (
            ctx.upload("cos", &cos, &[cap, half]).unwrap(),
            ctx.upload("sin", &sin, &[cap, half]).unwrap(),
        );
        let k_cache = ctx.zeros("k_cache", &[kv_heads, cap, hd]).unwrap();
        let v_cache = ctx.zeros("v_cache", &[kv_heads, cap, hd]).unwrap();
        let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
        // Prefill, decode, and decodes over more than SPLIT_KEYS keys (split over the sequence
        // into 2 and 3 parts, then merged).
        assert_eq!(medphi::gpu::SPLIT_KEYS, 256);
        let partials = ctx
            .zeros(
                "partials",
                &[medphi::gpu::attention_partials_len(heads, hd, cap)],
            )
            .unwrap();
        for (start, seq) in [
            (0usize, 9usize),
            (9, 1),
            (10, 3),
            (13, 290),
            (303, 1),
            (304, 200),
            (504, 1),
        ] {
            let q = values(&rand(&[seq, heads * hd], 1.0));
            let kk = values(&rand(&[seq, kv_heads * hd], 1.0));
            let v = values(&rand(&[seq, kv_heads * hd], 1.0));
            for t in 0..seq {
                all_k.push(kk[t * kv_heads * hd..][..kv_heads * hd].to_vec());
                all_v.push(v[t * kv_heads * hd..][..kv_heads * hd].to_vec());
            }
            let (qb, kb, vb) = (
                ctx.upload("q", &q, &[seq, heads * hd]).unwrap(),
                ctx.upload("k", &kk, &[seq, kv_heads * hd]).unwrap(),
                ctx.upload("v", &v, &[seq, kv_heads * hd]).unwrap(),
            );
            let q_out = ctx.zeros("q_rot", &[seq, heads * hd]).unwrap();
            let out = ctx.zeros("attn", &[seq, heads * hd]).unwrap();
            let shape = medphi::gpu::AttentionShape {
                seq: seq as u32,
                heads: heads as u32,
                kv_heads: kv_heads as u32,
                head_dim: hd as u32,
                rotary_dim: rd as u32,
                start: start as u32,
                capacity: cap as u32,
            };
            run(&ctx, |enc| {
                let b = medphi::gpu::RopeKvBuffers {
                    q: &qb,
                    k: &kb,
                    v: &vb,
                    cos: &cos_b,
                    sin: &sin_b,
                    q_out: &q_out,
                    k_cache: &k_cache,
                    v_cache: &v_cache,
                };
                k.rope_kv(&ctx, enc, shape, b).unwrap();
                let b = medphi::gpu::AttentionBuffers {
                    q: &q_out,
                    k_cache: &k_cache,
                    v_cache: &v_cache,
                    partials: &partials,
                    out: &out,
                };
                k.attention(&ctx, enc, shape, b).unwrap();
            });
            let got = ctx.read(&out, q.len()).await.unwrap();
            let expected =
                attention_reference(&q, &all_k, &all_v, heads, kv_heads, hd, rd, start, theta);
            let diff = max_diff(&got, &expected);
            assert!(
                diff < 1e-4,
                "{variant}: start {start}, seq {seq}: max diff {diff}"
            );
        }
    }
}
