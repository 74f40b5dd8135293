//! Image placeholders, as transformers' `Gemma3Processor` lays them out.
//!
//! The chat template writes one `<start_of_image>` per image. Before tokenizing, the processor
//! replaces each, in the TEXT, with
//! `"\n\n" + boi + image_token * tokens_per_image + eoi + "\n\n"` (its `full_image_sequence`).
//! Expanding the text rather than the ids matters: the `"\n\n"` runs join the newlines around
//! them into single tokens (`"\n\n\n"` is one token), exactly as the reference does.
//! After encoding, [`ImageTokens::check_ids`] verifies that the ids hold one run of
//! `tokens_per_image` image tokens per image (vLLM #14897 is what a silent mismatch costs).

use crate::error::{Result, TokenizerError};
use crate::tokenizer::Tokenizer;

/// The text transformers' `Gemma3Processor` puts in place of one image placeholder.
pub fn image_sequence(boi: &str, image_token: &str, eoi: &str, tokens_per_image: usize) -> String {
    let mut out =
        String::with_capacity(4 + boi.len() + eoi.len() + image_token.len() * tokens_per_image);
    out.push_str("\n\n");
    out.push_str(boi);
    for _ in 0..tokens_per_image {
        out.push_str(image_token);
    }
    out.push_str(eoi);
    out.push_str("\n\n");
    out
}

/// Replaces every `boi` in `text` with
/// `"\n\n" + boi + image_token * tokens_per_image + eoi + "\n\n"`, left to right, as
/// `Gemma3Processor` does without pan-and-scan.
pub fn expand_image_placeholders(
    text: &str,
    boi: &str,
    image_token: &str,
    eoi: &str,
    tokens_per_image: usize,
) -> String {
    if boi.is_empty() {
        return text.to_owned();
    }
    text.replace(
        boi,
        &image_sequence(boi, image_token, eoi, tokens_per_image),
    )
}

/// How many times `image_token_id` occurs in `ids`.
pub fn count_image_tokens(ids: &[u32], image_token_id: u32) -> usize {
    ids.iter().filter(|&&id| id == image_token_id).count()
}

/// The image tokens of a multimodal model: strings and ids, and soft tokens per image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTokens {
    /// `<start_of_image>`: what the chat template writes for an image, and the start of its run.
    pub boi: String,
    /// Its id (`boi_token_index` in config.json).
    pub boi_id: u32,
    /// `<image_soft_token>`: one per soft token, replaced by image embeddings in the model.
    pub image: String,
    /// Its id (`image_token_index` in config.json).
    pub image_id: u32,
    /// `<end_of_image>`.
    pub eoi: String,
    /// Its id (`eoi_token_index` in config.json).
    pub eoi_id: u32,
    /// Soft tokens per image (`mm_tokens_per_image`, 256 for Gemma 3).
    pub tokens_per_image: usize,
}

impl ImageTokens {
    /// From the token strings (as `tokenizer_config.json` names them), ids looked up in the
    /// vocabulary.
    pub fn from_strings(
        tokenizer: &Tokenizer,
        boi: &str,
        image: &str,
        eoi: &str,
        tokens_per_image: usize,
    ) -> Result<Self> {
        let id = |token: &str, what: &'static str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownToken {
                    token: token.to_owned(),
                    what,
                })
        };
        Ok(Self {
            boi: boi.to_owned(),
            boi_id: id(boi, "start of image")?,
            image: image.to_owned(),
            image_id: id(image, "image soft token")?,
            eoi: eoi.to_owned(),
            eoi_id: id(eoi, "end of image")?,
            tokens_per_image,
        })
    }

    /// From the ids a model's config.json gives (`boi_token_index`, `image_token_index`,
    /// `eoi_token_index`), strings looked up in the vocabulary.
    pub fn from_ids(
        tokenizer: &Tokenizer,
        boi_id: u32,
        image_id: u32,
        eoi_id: u32,
        tokens_per_image: usize,
    ) -> Result<Self> {
        let piece = |id: u32| {
            tokenizer
                .id_to_token(id)
                .ok_or(TokenizerError::InvalidTokenId {
                    id,
                    vocab_size: tokenizer.vocab_size(),
                })
        };
        Ok(Self {
            boi: piece(boi_id)?,
            boi_id,
            image: piece(image_id)?,
            image_id,
            eoi: piece(eoi_id)?,
            eoi_id,
            tokens_per_image,
        })
    }

    /// The text that stands for one image.
    pub fn sequence(&self) -> String {
        image_sequence(&self.boi, &self.image, &self.eoi, self.tokens_per_image)
    }

    /// Expands the `n_images` placeholders of a rendered prompt; fails if the prompt holds a
    /// different number of placeholders (e.g. a user typed `<start_of_image>`).
    pub fn expand(&self, text: &str, n_images: usize) -> Result<String> {
        self.expand_with_crops(text, &vec![0; n_images])
    }

    /// Like [`expand`](Self::expand), for pan-and-scan: image `i` has `crops[i]` crops
    /// (0: none). An image with crops becomes, as in `Gemma3Processor`,
    /// `"Here is the original image {seq} and here are some crops to help you see better "`
    /// followed by `crops[i]` copies of `{seq}` joined by spaces.
    pub fn expand_with_crops(&self, text: &str, crops: &[usize]) -> Result<String> {
        let found = text.matches(self.boi.as_str()).count();
        if found != crops.len() {
            return Err(TokenizerError::ImagePlaceholders(format!(
                "the prompt holds {found} {} placeholders for {} images",
                self.boi,
                crops.len()
            )));
        }
        let sequence = self.sequence();
        let mut out = String::with_capacity(text.len() + crops.len() * sequence.len());
        let mut pieces = text.split(self.boi.as_str());
        if let Some(first) = pieces.next() {
            out.push_str(first);
        }
        for (piece, &n_crops) in pieces.zip(crops) {
            if n_crops == 0 {
                out.push_str(&sequence);
            } else {
                out.push_str("Here is the original image ");
                out.push_str(&sequence);
                out.push_str(" and here are some crops to help you see better ");
                out.push_str(&vec![sequence.as_str(); n_crops].join(" "));
            }
            out.push_str(piece);
        }
        Ok(out)
    }

    /// The positions of each run of image soft tokens in `ids`, in order.
    pub fn spans(&self, ids: &[u32]) -> Vec<std::ops::Range<usize>> {
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == self.image_id {
                let start = i;
                while i < ids.len() && ids[i] == self.image_id {
                    i += 1;
                }
                spans.push(start..i);
            } else {
                i += 1;
            }
        }
        spans
    }

    /// Verifies encoded ids: `expected_runs` runs (images, crops included) of exactly
    /// `tokens_per_image` image tokens, each between BOI and EOI.
    pub fn check_ids(&self, ids: &[u32], expected_runs: usize) -> Result<()> {
        let count = count_image_tokens(ids, self.image_id);
        let expected = expected_runs * self.tokens_per_image;
        if count != expected {
            return Err(TokenizerError::ImagePlaceholders(format!(
                "the ids hold {count} image tokens, expected {expected} ({expected_runs} images \
                 x {})",
                self.tokens_per_image
            )));
        }
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != self.image_id {
                i += 1;
                continue;
            }
            let start = i;
            while i < ids.len() && ids[i] == self.image_id {
                i += 1;
            }
            let framed =
                start > 0 && ids[start - 1] == self.boi_id && ids.get(i) == Some(&self.eoi_id);
            if i - start != self.tokens_per_image || !framed {
                return Err(TokenizerError::ImagePlaceholders(format!(
                    "image tokens at {start}..{i} are not one run of {} between {} and {}",
                    self.tokens_per_image, self.boi, self.eoi
                )));
            }
        }
        Ok(())
    }
}
