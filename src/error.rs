//! One error type for the library: every failure names what it was about (a file, the
//! config, the prompt) so the CLI and the browser can show it as a single readable line.

use std::fmt::Display;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (weights, config, tokenizer, benchmark data) is missing or malformed.
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    /// The model configuration is inconsistent or unsupported.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A request the model cannot serve (prompt too long, bad sampling options, …).
    #[error("{0}")]
    Input(String),
    /// The GPU is missing, too small, or failed.
    #[error("GPU: {0}")]
    Gpu(String),
    /// A tensor operation failed; this indicates a bug rather than bad input.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(file: impl Display, msg: impl Display) -> Self {
        Error::File {
            file: file.to_string(),
            msg: msg.to_string(),
        }
    }

    pub fn config(msg: impl Display) -> Self {
        Error::Config(msg.to_string())
    }

    pub fn gpu(msg: impl Display) -> Self {
        Error::Gpu(msg.to_string())
    }

    pub fn input(msg: impl Display) -> Self {
        Error::Input(msg.to_string())
    }
}
