//! Hostile files (issue 15): each is built in a temp dir from the fixtures, then
//! `medphi info` and `medphi generate` run on it under a 4 GiB address-space limit. A file
//! that is broken must end in exit code 1 and one line on stderr naming the problem; a file
//! that is merely odd but valid must give the same answer as the fixture it came from. No
//! child may peak above 2 GiB of resident memory.
//!
//! Also fault injection for loading: every fixture weight file truncated at every offset
//! of its header (GGUF: of its structure, the two big tokenizer arrays sampled) and at a
//! spread of offsets through its data must end in a clean error.
#![cfg(all(unix, feature = "cli"))]

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::DType;
use common::fixtures;
use medphi::model::{expected_tensors, Phi, PhiConfig};
use medphi::tokenizer::PhiTokenizer;
use medphi::weights::{Bytes, Gguf, Safetensors, TensorSource};

const ADDRESS_SPACE_LIMIT: u64 = 4 << 30;
const RSS_LIMIT_KIB: i64 = 2 << 20;
const ALIGNMENT: usize = 32;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    max_rss_kib: i64,
}

/// Runs `medphi args…` with RLIMIT_AS at 4 GiB; returns its exit code, output and peak RSS.
fn medphi(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medphi"));
    cmd.args(args)
        .env_remove("MEDPHI_MODEL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE_LIMIT,
                rlim_max: ADDRESS_SPACE_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Reaped below by wait4, which also reports this child's own peak RSS.
    #[allow(clippy::zombie_processes)]
    let mut child = cmd.spawn().unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    // Both pipes carry little; stderr is read on a thread so neither can fill up.
    let mut err_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        err_pipe.read_to_string(&mut s).unwrap();
        s
    });
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    stderr.push_str(&reader.join().unwrap());
    let mut status = 0;
    // SAFETY: plain FFI; `usage` is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        panic!(
            "medphi {args:?} was killed by signal {} (stderr: {stderr})",
            libc::WTERMSIG(status)
        );
    };
    Run {
        code,
        stdout,
        stderr,
        max_rss_kib: usage.ru_maxrss,
    }
}

fn info(model: &Path) -> Run {
    medphi(&["info", "--model", model.to_str().unwrap()])
}

fn generate(model: &Path, prompt: &str) -> Run {
    medphi(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
    ])
}

fn check_rss(what: &str, run: &Run) {
    assert!(
        run.max_rss_kib < RSS_LIMIT_KIB,
        "{what}: peak RSS {} MiB",
        run.max_rss_kib / 1024
    );
}

/// Exit code 1, exactly one line on stderr, naming the problem with every one of `needles`.
fn assert_refused(what: &str, run: &Run, needles: &[&str]) {
    check_rss(what, run);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        run.code, 1,
        "{what}: exit code {} (stdout {:?}, stderr {:?})",
        run.code, run.stdout, run.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "{what}: stderr is not one line: {:?}",
        run.stderr
    );
    assert!(lines[0].starts_with("error: "), "{what}: {:?}", lines[0]);
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{what}: error {:?} does not mention {n:?}",
            lines[0]
        );
    }
    eprintln!("{what}: {}", lines[0]);
}

fn assert_ok(what: &str, run: &Run) {
    check_rss(what, run);
    assert_eq!(
        run.code, 0,
        "{what}: exit code {} (stderr {:?})",
        run.code, run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
}

/// `info`'s lines except those that name the file or its size (and `skip`).
fn info_lines(run: &Run, skip: &[&str]) -> Vec<String> {
    run.stdout
        .lines()
        .filter(|l| !l.starts_with("model ") && !l.starts_with("size on disk"))
        .filter(|l| !skip.iter().any(|s| l.starts_with(s)))
        .map(str::to_string)
        .collect()
}

// ---- building hostile files -------------------------------------------------------

/// A GGUF metadata key, value type and value bytes.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

enum Part {
    Bytes(Vec<u8>),
    Zeros(usize),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Zeros(n) => *n,
        }
    }
}

/// Writes `gguf` to `path` with `kvs` metadata entries (given as `parts`) inserted before
/// its own, plus a padding entry that keeps the inserted length a multiple of the
/// alignment, so the tensor data stays where the file's offsets say it is.
fn gguf_with_kvs(path: &Path, gguf: &[u8], kvs: u64, parts: Vec<Part>) {
    let inserted: usize = parts.iter().map(Part::len).sum();
    const PAD_KEY: &str = "medphi.pad";
    let pad_overhead = 8 + PAD_KEY.len() + 4 + 8;
    let pad_len = (ALIGNMENT - (inserted + pad_overhead) % ALIGNMENT) % ALIGNMENT;
    let mut value = (pad_len as u64).to_le_bytes().to_vec();
    value.extend(std::iter::repeat_n(b' ', pad_len));
    let pad = kv(PAD_KEY, 8, &value);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let old_kvs = u64::from_le_bytes(gguf[16..24].try_into().unwrap());
    f.write_all(&gguf[..16]).unwrap();
    f.write_all(&(old_kvs + kvs + 1).to_le_bytes()).unwrap();
    for part in parts {
        match part {
            Part::Bytes(b) => f.write_all(&b).unwrap(),
            Part::Zeros(n) => {
                let chunk = vec![0u8; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    f.write_all(&chunk[..k]).unwrap();
                    left -= k;
                }
            }
        }
    }
    f.write_all(&pad).unwrap();
    f.write_all(&gguf[24..]).unwrap();
    f.flush().unwrap();
}

/// Byte offset of the tensor table entry of `name`: where its dimension count starts.
fn tensor_entry(gguf: &[u8], name: &str) -> usize {
    let mut pattern = (name.len() as u64).to_le_bytes().to_vec();
    pattern.extend(name.as_bytes());
    let at = gguf
        .windows(pattern.len())
        .rposition(|w| w == pattern)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    at + pattern.len()
}

/// (dims offset, n_dims, type offset, offset offset) of a tensor entry.
fn tensor_fields(gguf: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let at = tensor_entry(gguf, name);
    let n_dims = u32::from_le_bytes(gguf[at..at + 4].try_into().unwrap()) as usize;
    let dims = at + 4;
    let ty = dims + 8 * n_dims;
    (dims, n_dims, ty, ty + 4)
}

fn q8_fixture() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-phi-q8_0.gguf")).unwrap()
}

/// A copy of the tiny-phi folder in `dir`, with `edit` applied to its JSON file `file`.
fn tiny_phi_with(
    dir: &Path,
    name: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-phi").join(f), model.join(f)).unwrap();
    }
    let path = model.join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    model
}

#[test]
fn hostile_files_end_in_a_clear_error_or_the_right_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q8 = q8_fixture();
    let tiny_phi = fixtures().join("tiny-phi");
    let q8_path = fixtures().join("tiny-phi-q8_0.gguf");
    let long_prompt = "The patient presented with fever, cough and shortness of breath.";

    // Baselines: the unmodified fixtures.
    let base_info = info(&tiny_phi);
    assert_ok("tiny-phi info", &base_info);
    let base_gen = generate(&tiny_phi, "hi");
    assert_ok("tiny-phi generate", &base_gen);
    let base_gen_long = generate(&tiny_phi, long_prompt);
    assert_ok("tiny-phi generate long", &base_gen_long);
    let base_q8_info = info(&q8_path);
    assert_ok("q8_0 info", &base_q8_info);
    let base_q8_gen = generate(&q8_path, "hi");
    assert_ok("q8_0 generate", &base_q8_gen);

    // Broken GGUFs: refused by both commands.
    let mut refused: Vec<(&str, PathBuf, Vec<&str>)> = Vec::new();

    let p = d.join("alignment0.gguf");
    gguf_with_kvs(
        &p,
        &q8,
        1,
        vec![Part::Bytes(kv("general.alignment", 4, &0u32.to_le_bytes()))],
    );
    refused.push((
        "alignment 0",
        p,
        vec!["alignment0.gguf", "general.alignment 0", "power of two"],
    ));

    let p = d.join("claimed-array.gguf");
    let mut arr = 0u32.to_le_bytes().to_vec(); // u8 elements
    arr.extend(100_000_000u64.to_le_bytes());
    gguf_with_kvs(&p, &q8, 1, vec![Part::Bytes(kv("medphi.big", 9, &arr))]);
    refused.push((
        "claimed 10^8 array",
        p,
        vec!["medphi.big", "100000000", "bytes left"],
    ));

    let p = d.join("nested.gguf");
    let mut nested = Vec::new();
    for _ in 0..1000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    // The key's own type is the outermost array.
    gguf_with_kvs(
        &p,
        &q8,
        1,
        vec![Part::Bytes(kv("medphi.nested", 9, &nested))],
    );
    refused.push((
        "nested arrays 1000 deep",
        p,
        vec!["medphi.nested", "nested"],
    ));

    let p = d.join("offset-past-end.gguf");
    let mut b = q8.clone();
    let (_, _, _, off) = tensor_fields(&b, "output.weight");
    let past = (b.len() as u64 * 2).next_multiple_of(ALIGNMENT as u64);
    b[off..off + 8].copy_from_slice(&past.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    refused.push((
        "tensor offset past the end",
        p,
        vec!["output.weight", "past the end"],
    ));

    let p = d.join("string-2-63.gguf");
    let mut b = q8.clone();
    let key = b"general.architecture";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    refused.push((
        "string length 2^63",
        p,
        vec!["general.architecture", "9223372036854775808"],
    ));

    let p = d.join("dims-overflow.gguf");
    let mut b = q8.clone();
    let (dims, n_dims, _, _) = tensor_fields(&b, "output.weight");
    assert_eq!(n_dims, 2);
    b[dims..dims + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[dims + 8..dims + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    refused.push(("dims overflow", p, vec!["output.weight", "overflows"]));

    let p = d.join("unknown-type.gguf");
    let mut b = q8.clone();
    let (_, _, ty, _) = tensor_fields(&b, "output.weight");
    b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    refused.push((
        "unknown tensor type",
        p,
        vec!["output.weight", "unknown GGML type 99"],
    ));

    // Broken folders.
    let st = tiny_phi_with(d, "st-header-2-60", "config.json", |_| {});
    let weights = st.join("model.safetensors");
    let mut b = std::fs::read(&weights).unwrap();
    b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&weights, &b).unwrap();
    refused.push((
        "safetensors header length 2^60",
        st,
        vec!["model.safetensors"],
    ));

    let small_vocab = tiny_phi_with(d, "small-vocab", "config.json", |v| {
        v["vocab_size"] = 50_000.into();
    });
    refused.push((
        "tokenizer ids beyond vocab_size",
        small_vocab,
        vec!["tokenizer has ids up to 50294", "50000 rows"],
    ));

    for (what, path, needles) in &refused {
        assert_refused(&format!("{what} (info)"), &info(path), needles);
        assert_refused(
            &format!("{what} (generate)"),
            &generate(path, "hi"),
            needles,
        );
    }

    // A 10^8-element array that is really there: a valid file, read lazily.
    let p = d.join("present-array.gguf");
    let mut head = kv("medphi.big", 9, &0u32.to_le_bytes());
    head.extend(100_000_000u64.to_le_bytes());
    gguf_with_kvs(
        &p,
        &q8,
        1,
        vec![Part::Bytes(head), Part::Zeros(100_000_000)],
    );
    assert!(std::fs::metadata(&p).unwrap().len() > 100_000_000);
    let run = info(&p);
    assert_ok("present 10^8 array (info)", &run);
    assert_eq!(info_lines(&run, &[]), info_lines(&base_q8_info, &[]));
    let run = generate(&p, "hi");
    assert_ok("present 10^8 array (generate)", &run);
    assert_eq!(run.stdout, base_q8_gen.stdout);

    // Odd but valid folders: the same answers as tiny-phi.
    let truncation = tiny_phi_with(d, "truncation", "tokenizer.json", |v| {
        v["truncation"] = serde_json::json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5});
    });
    let padding = tiny_phi_with(d, "padding", "tokenizer.json", |v| {
        v["padding"] = serde_json::json!({"strategy": {"Fixed": 4_000_000_000u64}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 50256, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
    });
    let long_context = tiny_phi_with(d, "long-context", "config.json", |v| {
        v["max_position_embeddings"] = 1_000_000.into();
    });
    for (what, path, skip) in [
        ("truncation section", &truncation, vec![]),
        ("padding 4e9", &padding, vec![]),
        (
            "max_position_embeddings 10^6",
            &long_context,
            vec!["context"],
        ),
    ] {
        let run = info(path);
        assert_ok(&format!("{what} (info)"), &run);
        assert_eq!(
            info_lines(&run, &skip),
            info_lines(&base_info, &skip),
            "{what}"
        );
        let run = generate(path, "hi");
        assert_ok(&format!("{what} (generate)"), &run);
        assert_eq!(run.stdout, base_gen.stdout, "{what}");
    }
    let run = info(&long_context);
    assert!(
        run.stdout.contains("context        1000000 tokens"),
        "{}",
        run.stdout
    );
    let run = generate(&long_context, long_prompt);
    assert_ok("max_position_embeddings 10^6 (long prompt)", &run);
    assert_eq!(run.stdout, base_gen_long.stdout);
    let run = generate(&padding, long_prompt);
    assert_ok("padding 4e9 (long prompt)", &run);
    assert_eq!(run.stdout, base_gen_long.stdout);
    // A prompt longer than truncation.max_length is refused, not silently cut.
    assert_refused(
        "truncation section (long prompt)",
        &generate(&truncation, long_prompt),
        &["truncation.max_length", "2"],
    );

    // SAFETY: plain FFI; `usage` is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    assert!(
        usage.ru_maxrss < RSS_LIMIT_KIB,
        "children peaked at {} MiB",
        usage.ru_maxrss / 1024
    );
    eprintln!("peak RSS of the children: {} MiB", usage.ru_maxrss / 1024);
}

// ---- fault injection: truncated weight files ------------------------------------------

/// Offsets to cut a file of `len` bytes at: every one in the `dense` ranges (start, end), `spread` more
/// evenly through the whole file, and the last byte.
fn cut_points(len: usize, dense: &[(usize, usize)], spread: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = dense
        .iter()
        .flat_map(|&(start, end)| start.min(len)..end.min(len))
        .collect();
    cuts.extend((0..spread).map(|i| i * len / spread));
    cuts.push(len - 1);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// The first `len` bytes of `path`, mapped (no copy, so thousands of cuts stay cheap).
fn first_bytes(path: &Path, len: usize) -> Bytes {
    if len == 0 {
        return Bytes::Owned(Vec::new());
    }
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only map of a fixture nothing writes to.
    Bytes::Mapped(unsafe { memmap2::MmapOptions::new().len(len).map(&file).unwrap() })
}

/// Loads a GGUF as `info` and `generate` do: header, config, embedded tokenizer (if any),
/// every tensor the config expects.
fn load_gguf(bytes: Bytes) -> medphi::Result<()> {
    let gguf = Gguf::from_bytes("cut.gguf".into(), bytes, DType::F32)?;
    let cfg = gguf.config()?;
    if let Some(json) = gguf.tokenizer_json()? {
        PhiTokenizer::from_bytes(json.as_bytes(), "embedded tokenizer")?;
    }
    Phi::load(&cfg, &gguf, true)?;
    Ok(())
}

/// The end of the last tensor's data: cutting at or beyond it leaves a loadable file.
fn gguf_data_end(bytes: &[u8]) -> usize {
    let mut r = std::io::Cursor::new(bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut r).unwrap();
    content
        .tensor_infos
        .values()
        .map(|t| {
            let elems = t.shape.elem_count();
            content.tensor_data_offset as usize
                + t.offset as usize
                + elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()
        })
        .max()
        .unwrap()
}

#[test]
fn truncated_gguf_files_fail_cleanly() {
    for name in [
        "tiny-phi-q8_0.gguf",
        "tiny-phi-q4_0.gguf",
        "tiny-phi-f16.gguf",
    ] {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).unwrap();
        let data_start = {
            let mut r = std::io::Cursor::new(&bytes);
            candle_core::quantized::gguf_file::Content::read(&mut r)
                .unwrap()
                .tensor_data_offset as usize
        };
        let data_end = gguf_data_end(&bytes);
        // The header: every offset of its first 4 KiB (magic, counts, the scalar metadata)
        // and of the 4 KiB before the data (the last metadata and the whole tensor table);
        // between them (q8_0's embedded tokenizer arrays, 1.8 MB) every 257th byte.
        let mut cuts = cut_points(
            bytes.len(),
            &[
                (0, 4096),
                (data_start.saturating_sub(4096), data_start + 64),
            ],
            256,
        );
        cuts.extend((4096..data_start.saturating_sub(4096)).step_by(257));
        cuts.sort_unstable();
        cuts.dedup();
        let mut refused = 0;
        for &cut in &cuts {
            match load_gguf(first_bytes(&path, cut)) {
                Err(e) => {
                    assert!(
                        !matches!(e, medphi::Error::Tensor(_)),
                        "{name} cut at {cut}: {e}"
                    );
                    refused += 1;
                }
                Ok(()) => assert!(
                    cut >= data_end,
                    "{name} cut at {cut} (tensor data ends at {data_end}) loaded"
                ),
            }
        }
        eprintln!("{name}: {} cuts, {refused} refused", cuts.len());
    }
}

/// Loads safetensors `shards` against the tiny-phi config: header checks, every tensor.
fn load_safetensors(cfg: &PhiConfig, shards: Vec<(String, Bytes)>) -> medphi::Result<()> {
    let st = Safetensors::from_shards(shards, DType::F32)?;
    let expected = expected_tensors(cfg);
    st.check(&expected)?;
    for (name, shape) in &expected {
        st.tensor(name, shape)?;
    }
    Ok(())
}

#[test]
fn truncated_safetensors_files_fail_cleanly() {
    let cfg = PhiConfig::from_json(
        &std::fs::read_to_string(fixtures().join("tiny-phi/config.json")).unwrap(),
        "config.json",
    )
    .unwrap();
    let cases: [&[&str]; 2] = [
        &["tiny-phi/model.safetensors"],
        &[
            "tiny-phi-sharded/model-00001-of-00002.safetensors",
            "tiny-phi-sharded/model-00002-of-00002.safetensors",
        ],
    ];
    for files in cases {
        let paths: Vec<PathBuf> = files.iter().map(|f| fixtures().join(f)).collect();
        let whole: Vec<(String, Bytes)> = paths
            .iter()
            .map(|p| (p.display().to_string(), Bytes::open(p).unwrap()))
            .collect();
        load_safetensors(&cfg, whole).unwrap();
        for (i, path) in paths.iter().enumerate() {
            let len = std::fs::metadata(path).unwrap().len() as usize;
            let head = std::fs::read(path).unwrap()[..8].to_vec();
            let header_end = 8 + u64::from_le_bytes(head.try_into().unwrap()) as usize;
            let cuts = cut_points(len, &[(0, header_end + 64)], 256);
            for &cut in &cuts {
                let shards = paths
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        let bytes = if i == j {
                            first_bytes(p, cut)
                        } else {
                            Bytes::open(p).unwrap()
                        };
                        (p.display().to_string(), bytes)
                    })
                    .collect();
                match load_safetensors(&cfg, shards) {
                    Err(e) => assert!(
                        !matches!(e, medphi::Error::Tensor(_)),
                        "{} cut at {cut}: {e}",
                        path.display()
                    ),
                    Ok(()) => panic!("{} cut at {cut} of {len} loaded", path.display()),
                }
            }
            eprintln!(
                "{}: {} cuts (header {header_end} bytes), all refused",
                files[i],
                cuts.len()
            );
        }
    }
}
