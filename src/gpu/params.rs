//! The kernels' parameter blocks, each defined once here: the Rust struct whose bytes are
//! uploaded, and, generated from the same field list, the WGSL `struct Params` and its
//! `var<uniform> p` that every kernel source is compiled with. The two cannot drift apart.

/// A kernel's uniform parameter block: every field a 4-byte `u32` or `f32`.
pub trait GpuParams: bytemuck::Pod {
    /// `(name, WGSL type)` of each field, in order.
    const FIELDS: &'static [(&'static str, &'static str)];

    /// WGSL declaring `p` with these fields, padded to the 16 bytes a uniform block needs.
    fn wgsl() -> String {
        let mut s = String::from("struct Params {\n");
        for (name, ty) in Self::FIELDS {
            s.push_str(&format!("    {name}: {ty},\n"));
        }
        for i in Self::FIELDS.len()..padded_words(Self::FIELDS.len()) {
            s.push_str(&format!("    _pad{i}: u32,\n"));
        }
        s.push_str("}\n\n@group(0) @binding(0) var<uniform> p: Params;\n\n");
        s
    }

    /// The bytes to upload: `self`, zero-padded as `wgsl` pads the struct.
    fn uniform_bytes(&self) -> Vec<u8> {
        let mut bytes = bytemuck::bytes_of(self).to_vec();
        bytes.resize(4 * padded_words(Self::FIELDS.len()), 0);
        bytes
    }
}

/// 4-byte words in a uniform block of `n` fields: a whole number of 16-byte rows.
fn padded_words(n: usize) -> usize {
    n.max(1).next_multiple_of(4)
}

/// Declares parameter structs: `#[repr(C)]` Pod structs plus their [`GpuParams`] field list.
macro_rules! gpu_params {
    ($($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ident),* $(,)? })*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
            pub struct $name {
                $($(#[$fmeta])* pub $field: $ty),*
            }

            impl GpuParams for $name {
                const FIELDS: &'static [(&'static str, &'static str)] =
                    &[$((stringify!($field), stringify!($ty))),*];
            }
        )*
    };
}

gpu_params! {
    /// `matmul.wgsl` and `gemv.wgsl`: `y[row · ldy + col_offset + col] = x[row] · w[col] + b[col]`.
    pub struct MatmulParams {
        pub m: u32,
        pub n: u32,
        pub k: u32,
        pub has_bias: u32,
        /// Row stride of the output (≥ n).
        pub ldy: u32,
        /// First output column written.
        pub col_offset: u32,
    }

    /// `layer_norm.wgsl`.
    pub struct LayerNormParams {
        pub rows: u32,
        pub dim: u32,
        pub eps: f32,
    }

    /// `embedding.wgsl`: rows `row_start..row_start + row_count` of the table are bound.
    pub struct EmbeddingParams {
        pub tokens: u32,
        pub dim: u32,
        pub row_start: u32,
        pub row_count: u32,
    }

    /// The element-wise kernels (`gelu_new.wgsl`, `residual.wgsl`).
    pub struct LenParams {
        pub len: u32,
    }

    /// `top_k.wgsl`.
    pub struct TopKParams {
        pub len: u32,
        pub k: u32,
        /// 0: greedy (no normaliser).
        pub inv_temp: f32,
    }

    /// `rope_kv.wgsl`: `seq` new tokens at positions `start..`, the cache holding
    /// `capacity` positions per head.
    pub struct RopeParams {
        pub seq: u32,
        pub heads: u32,
        pub kv_heads: u32,
        pub head_dim: u32,
        pub rotary_dim: u32,
        pub start: u32,
        pub capacity: u32,
    }

    /// `attention.wgsl`; `split_keys` > 0 splits one query's keys over workgroups.
    pub struct AttentionParams {
        pub seq: u32,
        pub heads: u32,
        pub kv_heads: u32,
        pub head_dim: u32,
        pub start: u32,
        pub capacity: u32,
        pub scale: f32,
        pub split_keys: u32,
    }

    /// `attention_merge.wgsl`.
    pub struct MergeParams {
        pub heads: u32,
        pub head_dim: u32,
        pub splits: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgsl_struct_follows_the_rust_fields_padded_to_16_bytes() {
        let wgsl = LayerNormParams::wgsl();
        assert!(wgsl.starts_with(
            "struct Params {\n    rows: u32,\n    dim: u32,\n    eps: f32,\n    _pad3: u32,\n}\n"
        ));
        assert!(wgsl.contains("@binding(0) var<uniform> p: Params;"));
        let p = LayerNormParams {
            rows: 2,
            dim: 3,
            eps: 1.0,
        };
        let bytes = p.uniform_bytes();
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[8..12], &1f32.to_le_bytes());
        // Eight fields fill two rows exactly: no padding.
        assert!(!AttentionParams::wgsl().contains("_pad"));
    }
}
