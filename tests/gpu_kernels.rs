//! WGSL kernels against the candle CPU path on random inputs, natively on whatever GPU
//! wgpu finds (Mesa's lavapipe in CI), including sizes that are not multiples of a tile.

use candle_core::{Device, Tensor, D};
use medphi::gpu::{GpuContext, Kernels, MatmulParams};

fn ctx() -> (GpuContext, Kernels) {
    let ctx = pollster::block_on(GpuContext::new())
        .expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)");
    let kernels = Kernels::new(&ctx);
    (ctx, kernels)
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

#[test]
fn matmul_with_bias_matches_candle() {
    let (ctx, k) = ctx();
    for (m, n, kk) in [
        (1, 19, 37),
        (3, 64, 128),
        (17, 33, 50),
        (64, 96, 160),
        (1, 1000, 2560),
    ] {
        let x = rand(&[m, kk], 1.0);
        let w = rand(&[n, kk], 0.05);
        let b = rand(&[n], 0.1);
        let expected = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let (xb, wb, bb) = (
            ctx.upload("x", &values(&x)).unwrap(),
            ctx.upload("w", &values(&w)).unwrap(),
            ctx.upload("b", &values(&b)).unwrap(),
        );
        let y = ctx.storage("y", m * n).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let p = MatmulParams {
            m: m as u32,
            n: n as u32,
            k: kk as u32,
            has_bias: 1,
        };
        k.matmul(&ctx, &mut enc, p, (&xb, &wb, &bb, &y)).unwrap();
        ctx.queue.submit([enc.finish()]);
        let got = pollster::block_on(ctx.read(&y, m * n)).unwrap();
        let diff = max_diff(&got, &values(&expected));
        assert!(diff < 1e-4, "({m}×{kk})·({n}×{kk})ᵀ: max diff {diff}");
    }
}

#[test]
fn layer_norm_matches_candle() {
    let (ctx, k) = ctx();
    for (rows, dim) in [(1, 32), (5, 37), (3, 2560)] {
        // An offset mean checks that the variance is computed around it.
        let x = (rand(&[rows, dim], 2.0) + 3.0).unwrap();
        let g = (rand(&[dim], 0.1) + 1.0).unwrap();
        let b = rand(&[dim], 0.1);
        let expected = candle_nn::ops::layer_norm(&x, &g, &b, 1e-5).unwrap();
        let (xb, gb, bb) = (
            ctx.upload("x", &values(&x)).unwrap(),
            ctx.upload("g", &values(&g)).unwrap(),
            ctx.upload("b", &values(&b)).unwrap(),
        );
        let y = ctx.storage("y", rows * dim).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        k.layer_norm(
            &ctx,
            &mut enc,
            rows as u32,
            dim as u32,
            1e-5,
            (&xb, &gb, &bb, &y),
        )
        .unwrap();
        ctx.queue.submit([enc.finish()]);
        let got = pollster::block_on(ctx.read(&y, rows * dim)).unwrap();
        let diff = max_diff(&got, &values(&expected));
        assert!(diff < 1e-4, "{rows}×{dim}: max diff {diff}");
        let mean_check = expected.mean_keepdim(D::Minus1).unwrap();
        assert!(values(&mean_check).iter().all(|m| m.is_finite()));
    }
}

#[test]
fn gelu_new_matches_candle_and_stays_finite_for_large_inputs() {
    let (ctx, k) = ctx();
    let mut input = values(&rand(&[1001], 3.0));
    input.extend([-1e4, -80.0, -20.0, 20.0, 80.0, 1e4]);
    let x = Tensor::new(input.as_slice(), &Device::Cpu).unwrap();
    let expected = values(&x.gelu().unwrap());
    let buf = ctx.upload("x", &input).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.gelu_new(&ctx, &mut enc, input.len() as u32, &buf)
        .unwrap();
    ctx.queue.submit([enc.finish()]);
    let got = pollster::block_on(ctx.read(&buf, input.len())).unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "gelu produced NaN/inf");
    // Relative for the huge inputs (where gelu(x) = x), absolute elsewhere.
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{g} vs {e}");
    }
}

#[test]
fn reports_adapter_limits_and_refuses_oversized_bindings() {
    let (ctx, _) = ctx();
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

#[test]
fn device_errors_become_errors_not_panics() {
    let (ctx, k) = ctx();
    // Reading back a buffer created without COPY_SRC is a validation error, which wgpu
    // would turn into a panic by default.
    let x = ctx.upload("x", &[1.0; 4]).unwrap();
    let tiny = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tiny"),
        size: 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let p = MatmulParams {
        m: 1,
        n: 1,
        k: 4,
        has_bias: 0,
    };
    k.matmul(&ctx, &mut enc, p, (&x, &x, &x, &tiny)).unwrap();
    ctx.queue.submit([enc.finish()]);
    let err = pollster::block_on(ctx.read(&tiny, 1))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("GPU:"), "{err}");
}
