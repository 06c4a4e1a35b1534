//! Prompt formats from Phi-2's model card.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `Instruct: {prompt}\nOutput:` — Phi-2's QA format.
    Instruct,
    /// `User: …\nAssistant: …` turns — Phi-2's chat format (the card's Alice/Bob).
    Chat,
    /// The text as given.
    Raw,
}

impl std::str::FromStr for PromptFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "instruct" => Ok(Self::Instruct),
            "chat" => Ok(Self::Chat),
            "raw" => Ok(Self::Raw),
            other => Err(Error::input(format!(
                "unknown prompt format {other:?} (expected instruct, chat or raw)"
            ))),
        }
    }
}

/// One finished exchange of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

impl PromptFormat {
    /// The model input for `message` after the earlier `history` of the conversation.
    pub fn render(self, history: &[Turn], message: &str) -> String {
        match self {
            PromptFormat::Raw => {
                let mut s: String = history
                    .iter()
                    .map(|t| format!("{}{}", t.user, t.assistant))
                    .collect();
                s.push_str(message);
                s
            }
            PromptFormat::Instruct => {
                let mut s: String = history
                    .iter()
                    .map(|t| format!("Instruct: {}\nOutput: {}\n", t.user, t.assistant.trim()))
                    .collect();
                s.push_str(&format!("Instruct: {message}\nOutput:"));
                s
            }
            PromptFormat::Chat => {
                let mut s: String = history
                    .iter()
                    .map(|t| format!("User: {}\nAssistant: {}\n", t.user, t.assistant.trim()))
                    .collect();
                s.push_str(&format!("User: {message}\nAssistant:"));
                s
            }
        }
    }

    /// Where the model starts writing the next turn itself.
    pub fn stop_strings(self) -> Vec<String> {
        match self {
            PromptFormat::Raw => vec![],
            PromptFormat::Instruct => vec!["\nInstruct:".into()],
            PromptFormat::Chat => vec!["\nUser:".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_model_card_formats() {
        assert_eq!(
            PromptFormat::Instruct.render(&[], "What is DKA?"),
            "Instruct: What is DKA?\nOutput:"
        );
        let history = [Turn {
            user: "Hi".into(),
            assistant: " Hello!".into(),
        }];
        assert_eq!(
            PromptFormat::Chat.render(&history, "Define sepsis."),
            "User: Hi\nAssistant: Hello!\nUser: Define sepsis.\nAssistant:"
        );
        assert_eq!(PromptFormat::Raw.render(&[], "abc"), "abc");
    }
}
