//! Checkpoints that survive a kill at any moment.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` in the run's output folder: a
//! complete model folder plus the optimizer state and `trainer_state.json`. It is written
//! into a temporary folder, every file is fsynced, and only then is the folder renamed to its
//! final name, so a checkpoint either exists whole or not at all. `trainer_state.json`,
//! written last, records a CRC-32 of every other file, and a resume verifies them, falling
//! back to the previous checkpoint if the latest does not check out. The last two are kept.
//! The output folder's own model files are hard links to the newest checkpoint's, each
//! swapped in by a rename, so the folder always loads as a model.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::error::{Error, Result};

const CHECKPOINTS: &str = "checkpoints";
const STATE: &str = "trainer_state.json";
/// Checkpoints kept: the newest, and one before it in case the newest is damaged.
const KEEP: usize = 2;
/// The name of a checkpoint folder being written, before its step number.
const UNCOMMITTED: &str = ".tmp-step-";
/// The model files a checkpoint shares with the output folder (those it has).
const MODEL_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
];

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub config: TrainConfig,
    /// CRC-32 (hex) of every other file of the checkpoint, by file name.
    pub checksums: std::collections::BTreeMap<String, String>,
}

/// A checkpoint being written: files go into a temporary folder until `commit`.
pub struct CheckpointWriter {
    out: PathBuf,
    tmp: PathBuf,
    step: u64,
    checksums: std::collections::BTreeMap<String, String>,
}

impl CheckpointWriter {
    pub fn new(out: &Path, step: u64) -> Result<Self> {
        let root = out.join(CHECKPOINTS);
        let tmp = root.join(format!("{UNCOMMITTED}{step:08}"));
        if tmp.exists() {
            // Left by a run killed while writing this step: never part of a checkpoint.
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::file(tmp.display(), e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::file(tmp.display(), e))?;
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            step,
            checksums: Default::default(),
        })
    }

    /// The path to write file `name` to; call `added(name)` once it is written.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Writes `bytes` as file `name`.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(name);
        std::fs::write(&path, bytes).map_err(|e| Error::file(path.display(), e))?;
        self.added(name)
    }

    /// Records a file written at `path(name)`: syncs it to disk and notes its checksum.
    pub fn added(&mut self, name: &str) -> Result<()> {
        let path = self.path(name);
        let crc = sync_and_checksum(&path)?;
        self.checksums.insert(name.to_string(), crc);
        Ok(())
    }

    /// Writes `trainer_state.json`, moves the folder into place, points the output folder's
    /// model files at it and drops checkpoints older than the last `KEEP`.
    pub fn commit(self, config: &TrainConfig) -> Result<PathBuf> {
        let state = TrainState {
            step: self.step,
            config: config.clone(),
            checksums: self.checksums,
        };
        let json = serde_json::to_string_pretty(&state).map_err(Error::input)?;
        let path = self.tmp.join(STATE);
        std::fs::write(&path, json).map_err(|e| Error::file(path.display(), e))?;
        sync_and_checksum(&path)?;
        sync_dir(&self.tmp)?;
        let root = self.out.join(CHECKPOINTS);
        let dir = root.join(format!("step-{:08}", self.step));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::file(dir.display(), e))?;
        }
        std::fs::rename(&self.tmp, &dir).map_err(|e| Error::file(dir.display(), e))?;
        sync_dir(&root)?;
        for name in MODEL_FILES {
            let (from, to) = (dir.join(name), self.out.join(name));
            if from.exists() {
                replace_with_link(&from, &to)?;
            } else if to.exists() {
                // A file of another kind of run (say, an adapter of an earlier LoRA run).
                std::fs::remove_file(&to).map_err(|e| Error::file(to.display(), e))?;
            }
        }
        sync_dir(&self.out)?;
        prune(&self.out)?;
        Ok(dir)
    }
}

/// Drops checkpoints older than the last `KEEP` and folders of saves that never committed.
/// A run killed between a commit and its pruning (or mid-save) leaves them behind; the next
/// commit, or the end of a resumed run that had nothing left to save, clears them.
pub fn prune(out: &Path) -> Result<()> {
    for old in checkpoints(out)?.into_iter().skip(KEEP) {
        std::fs::remove_dir_all(&old.1).map_err(|e| Error::file(old.1.display(), e))?;
    }
    let root = out.join(CHECKPOINTS);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::file(root.display(), e))?;
        if entry.file_name().to_string_lossy().starts_with(UNCOMMITTED) {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| Error::file(path.display(), e))?;
        }
    }
    Ok(())
}

/// Checkpoint folders in `out`, newest first, as (step, path).
fn checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = out.join(CHECKPOINTS);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::file(root.display(), e))?;
        let name = entry.file_name();
        if let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(found)
}

/// Whether `out` holds any checkpoint (a folder half-written by a failed save is none).
pub fn exists(out: &Path) -> Result<bool> {
    Ok(!checkpoints(out)?.is_empty())
}

/// Reads a checkpoint's state and verifies every file it lists.
pub fn verify(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(path.display(), e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| Error::file(path.display(), e))?;
    for (name, want) in &state.checksums {
        let file = dir.join(name);
        let got = checksum(&file)?;
        if &got != want {
            return Err(Error::file(
                file.display(),
                format!("checksum {got} does not match the recorded {want}: the file is damaged"),
            ));
        }
    }
    Ok(state)
}

/// The checkpoint to resume from in `dir`: its newest one that verifies (or `dir` itself if
/// it is a checkpoint folder). Also returns why newer checkpoints were passed over.
pub fn latest(dir: &Path) -> Result<(PathBuf, TrainState, Vec<String>)> {
    if dir.join(STATE).is_file() {
        let state = verify(dir)?;
        return Ok((dir.to_path_buf(), state, Vec::new()));
    }
    let mut skipped = Vec::new();
    for (_, path) in checkpoints(dir)? {
        match verify(&path) {
            Ok(state) => return Ok((path, state, skipped)),
            Err(e) => skipped.push(format!("skipped {}: {e}", path.display())),
        }
    }
    let why = if skipped.is_empty() {
        String::new()
    } else {
        format!(" ({})", skipped.join("; "))
    };
    Err(Error::file(
        dir.display(),
        format!("no usable checkpoint in {CHECKPOINTS}/{why}"),
    ))
}

/// Rewrites `to`'s `metrics.jsonl` as the lines of `from`'s with steps up to `step`, in one
/// rename: a resumed run neither repeats nor loses a step, and a half-written last line
/// from a kill is dropped.
pub fn restore_metrics(from: &Path, to: &Path, step: u64) -> Result<()> {
    let src = from.join("metrics.jsonl");
    let text = std::fs::read_to_string(&src).unwrap_or_default();
    let mut kept = String::new();
    for line in text.lines() {
        let step_of = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if step_of.is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let dst = to.join("metrics.jsonl");
    let tmp = to.join(".metrics.jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| Error::file(tmp.display(), e))?;
    sync_and_checksum(&tmp)?;
    std::fs::rename(&tmp, &dst).map_err(|e| Error::file(dst.display(), e))?;
    sync_dir(to)
}

fn checksum(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::file(path.display(), e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::file(path.display(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:08x}", hasher.finalize()))
}

fn sync_and_checksum(path: &Path) -> Result<String> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::file(path.display(), e))?;
    checksum(path)
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::file(dir.display(), e))
}

/// Points `to` at `from`'s data in one rename: a hard link where the file system has them,
/// a copy where not.
fn replace_with_link(from: &Path, to: &Path) -> Result<()> {
    let name = to.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = to.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(from, &tmp).is_err() {
        let mut src = std::fs::File::open(from).map_err(|e| Error::file(from.display(), e))?;
        let mut dst = std::fs::File::create(&tmp).map_err(|e| Error::file(tmp.display(), e))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| Error::file(tmp.display(), e))?;
        dst.flush()
            .and_then(|_| dst.sync_all())
            .map_err(|e| Error::file(tmp.display(), e))?;
    }
    std::fs::rename(&tmp, to).map_err(|e| Error::file(to.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a run killed after its last commit but before pruning (and another killed
    /// mid-save) leaves: pruning keeps the newest `KEEP` checkpoints and nothing else.
    #[test]
    fn pruning_keeps_the_newest_checkpoints_and_drops_unfinished_saves() {
        let out = tempfile::tempdir().unwrap();
        let root = out.path().join(CHECKPOINTS);
        for name in [
            "step-00000006",
            "step-00000007",
            "step-00000008",
            ".tmp-step-00000005",
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join(STATE), "{}").unwrap();
        }
        prune(out.path()).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["step-00000007", "step-00000008"]);
    }
}
