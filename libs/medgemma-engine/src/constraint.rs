//! Constrained decoding (JSON schema / regex) on top of [llguidance].
//!
//! * [`ConstraintFactory`] is built **once per model**: it converts the
//!   tokenizer's vocabulary into llguidance's token trie and precomputes the
//!   lexer slices (≈ 0.9 s for Gemma 3's 262k-piece vocabulary: build it at
//!   startup or on a background thread, not on the first request).
//!   It is cheap to clone (an `Arc`) and `Send + Sync`.
//! * [`Constraint`] is **per sequence**, created from a [`ConstraintSpec`].
//!   Compiling the grammar costs milliseconds, so create it off the async
//!   runtime. Each step:
//!
//! ```text
//! loop {
//!     if constraint.is_finished() { finish = Stop; break }   // structure complete
//!     if produced == max_tokens   { finish = Length; break } // NOT a valid document
//!     let mask = constraint.allowed_tokens()?;                // len = model vocab
//!     let s = sampler.sample(&mut logits, &ctx, &gen, Some(&mask))?;
//!     constraint.commit(s.token)?;
//!     if eos_ids.contains(&s.token) { finish = Stop; break }  // accepted: grammar was complete
//!     emit(s.token);
//! }
//! ```
//!
//! An EOS token is only ever in the mask when the grammar is in an accepting
//! state, so stopping on EOS (or on [`Constraint::is_finished`]) always yields
//! a complete document; running out of tokens first must be reported as
//! `length`, never as success.
//!
//! The padding rows of the model's embedding (model vocab larger than the
//! tokenizer's) are registered as unreachable special tokens, so they are
//! never allowed. llguidance runs with non-verbose errors and no stderr
//! logging, so error messages never contain generated text.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, StopReason, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::{DecoderWrapper, Tokenizer};

pub use crate::sampling::TokenMask;

/// Errors from building or driving a constraint.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer cannot be adapted (unknown decoder type, ...).
    #[error("tokenizer not supported for constrained decoding: {0}")]
    UnsupportedTokenizer(String),
    /// Bad EOS ids or vocabulary size given to [`ConstraintFactory::new`].
    #[error("invalid constraint factory configuration: {0}")]
    InvalidConfig(String),
    /// The JSON schema / regex could not be compiled.
    #[error("invalid constraint: {0}")]
    InvalidSpec(String),
    /// [`Constraint::commit`] got a token the grammar does not allow; the
    /// constraint is unchanged.
    #[error("token {token} is not allowed by the constraint")]
    TokenRejected {
        /// The rejected token id.
        token: u32,
    },
    /// The matcher failed (grammar too complex, internal error, ...); the
    /// constraint is unusable afterwards.
    #[error("constraint matcher failed: {0}")]
    Matcher(String),
}

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON schema (llguidance's supported subset: objects with
    /// required/optional properties, `additionalProperties`, arrays, enums,
    /// const, string/integer/number/boolean/null, anyOf, `$ref`, ...).
    /// The whole output must be one JSON value, written compactly (`", "` and
    /// `": "` separators, no other whitespace) unless the schema carries its own
    /// llguidance `x-guidance` options: free whitespace lets a small model loop
    /// on blanks until it runs out of tokens.
    JsonSchema(serde_json::Value),
    /// A Rust-`regex`-syntax regular expression the whole output must match.
    Regex(String),
}

/// Vocabulary statistics gathered while building the factory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabInfo {
    /// Vocabulary size of the tokenizer (including added tokens).
    pub tokenizer_vocab_size: usize,
    /// Vocabulary size of the model (= mask length).
    pub model_vocab_size: usize,
    /// Tokens treated as special (never produced by a JSON/regex grammar).
    pub special_tokens: usize,
    /// Tokens whose bytes could not be determined (never allowed).
    pub unusable_tokens: usize,
    /// Wall time spent building the token trie and lexer slices.
    pub build_time: Duration,
}

/// Shared, per-model state for creating [`Constraint`]s. Clone freely.
#[derive(Clone)]
pub struct ConstraintFactory {
    inner: Arc<FactoryInner>,
}

struct FactoryInner {
    parser_factory: ParserFactory,
    eos_ids: Vec<u32>,
    info: VocabInfo,
}

impl fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConstraintFactory")
            .field("eos_ids", &self.inner.eos_ids)
            .field("info", &self.inner.info)
            .finish()
    }
}

/// llguidance's view of our HF tokenizer (a re-implementation of
/// `toktrie_hf_tokenizers`, which is pinned to an older `tokenizers`).
struct HfTokEnv {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl HfTokEnv {
    fn encode(&self, s: &str) -> Vec<TokenId> {
        let vocab = self.trie.vocab_size();
        match self.tokenizer.encode(s, false) {
            Ok(enc) if enc.get_ids().iter().all(|&id| (id as usize) < vocab) => {
                enc.get_ids().to_vec()
            }
            Ok(_) | Err(_) => self.trie.greedy_tokenize(s.as_bytes()),
        }
    }
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.encode(s))
    }

    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.trie.tokenize_with_special(s, |s| self.encode(s))
        })
    }
}

/// How the tokenizer's pieces map to bytes.
enum PieceEncoding {
    /// SentencePiece-style (`▁` = space, `<0xNN>` = raw byte): Gemma, Llama 2.
    ByteFallback { space: char },
    /// GPT-2 byte-to-unicode mapping.
    ByteLevel,
}

fn detect_encoding(tokenizer: &Tokenizer) -> Result<PieceEncoding, ConstraintError> {
    fn walk(d: &DecoderWrapper, fallback: &mut bool, level: &mut bool, space: &mut char) {
        match d {
            DecoderWrapper::ByteFallback(_) => *fallback = true,
            DecoderWrapper::ByteLevel(_) => *level = true,
            DecoderWrapper::Replace(r) if r.content == " " => {
                // The pattern is private; read it back from the serialised form.
                if let Ok(v) = serde_json::to_value(r)
                    && let Some(s) = v["pattern"]["String"].as_str()
                {
                    let mut chars = s.chars();
                    if let (Some(c), None) = (chars.next(), chars.next()) {
                        *space = c;
                    }
                }
            }
            DecoderWrapper::Sequence(seq) => {
                for d in seq.get_decoders() {
                    walk(d, fallback, level, space);
                }
            }
            DecoderWrapper::BPE(_)
            | DecoderWrapper::WordPiece(_)
            | DecoderWrapper::Metaspace(_)
            | DecoderWrapper::CTC(_)
            | DecoderWrapper::Replace(_)
            | DecoderWrapper::Fuse(_)
            | DecoderWrapper::Strip(_) => {}
        }
    }
    let (mut fallback, mut level, mut space) = (false, false, ' ');
    if let Some(d) = tokenizer.get_decoder() {
        walk(d, &mut fallback, &mut level, &mut space);
    }
    if fallback {
        Ok(PieceEncoding::ByteFallback { space })
    } else if level {
        Ok(PieceEncoding::ByteLevel)
    } else {
        Err(ConstraintError::UnsupportedTokenizer(
            "decoder is neither ByteFallback nor ByteLevel".into(),
        ))
    }
}

/// GPT-2's byte-to-unicode table, inverted.
fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let self_mapped = |c: u32| matches!(c, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let code = if self_mapped(u32::from(b)) {
            u32::from(b)
        } else {
            next += 1;
            next - 1
        };
        if let Some(c) = char::from_u32(code) {
            map.insert(c, b);
        }
    }
    map
}

fn special_bytes(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 1);
    v.push(TokTrie::SPECIAL_TOKEN_MARKER);
    v.extend_from_slice(name.as_bytes());
    v
}

/// Byte string of every token id `< model_vocab` plus counts of special and
/// unusable tokens.
fn vocab_bytes(
    tokenizer: &Tokenizer,
    tokenizer_vocab: usize,
    model_vocab: usize,
) -> Result<(Vec<Vec<u8>>, usize, usize), ConstraintError> {
    let encoding = detect_encoding(tokenizer)?;
    let level_map = match encoding {
        PieceEncoding::ByteLevel => byte_level_map(),
        PieceEncoding::ByteFallback { .. } => Default::default(),
    };
    let added = tokenizer.get_added_tokens_decoder();
    let mut words = Vec::with_capacity(model_vocab);
    let (mut specials, mut unusable) = (0usize, 0usize);
    for id in 0..model_vocab {
        let tid = id as u32;
        if id >= tokenizer_vocab {
            // Embedding padding rows: unreachable special tokens.
            words.push(special_bytes(&format!("<[{id}]>")));
            specials += 1;
            continue;
        }
        if let Some(a) = added.get(&tid)
            && (a.special || (a.content.starts_with('<') && a.content.ends_with('>')))
        {
            words.push(special_bytes(&a.content));
            specials += 1;
            continue;
        }
        let Some(piece) = tokenizer.id_to_token(tid) else {
            words.push(Vec::new());
            unusable += 1;
            continue;
        };
        let bytes = match encoding {
            PieceEncoding::ByteFallback { space } => {
                let hex = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => vec![b],
                    None => piece.replace(space, " ").into_bytes(),
                }
            }
            PieceEncoding::ByteLevel => piece
                .chars()
                .map(|c| level_map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_default(),
        };
        if bytes.is_empty() {
            unusable += 1;
        }
        words.push(bytes);
    }
    Ok((words, specials, unusable))
}

/// Deepest JSON nesting accepted in a schema (serde_json's own parser limit).
pub const MAX_SCHEMA_DEPTH: usize = 128;

/// Nesting depth of a JSON value (scalars are 1), computed without recursion.
fn json_depth(v: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|x| (x, d + 1))),
            serde_json::Value::Null
            | serde_json::Value::Bool(_)
            | serde_json::Value::Number(_)
            | serde_json::Value::String(_) => {}
        }
    }
    max
}

impl ConstraintFactory {
    /// Builds the token trie for `tokenizer` (expensive: do it once per model).
    ///
    /// `eos_ids` are the tokens that end generation (e.g. Gemma's `<eos>` and
    /// `<end_of_turn>`); they are allowed exactly when the grammar accepts.
    /// `model_vocab_size` is the number of logits the model produces: masks
    /// have this length, rows beyond the tokenizer's vocabulary are never
    /// allowed, and tokenizer ids beyond it are dropped.
    pub fn new(
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
        model_vocab_size: usize,
    ) -> Result<Self, ConstraintError> {
        let start = Instant::now();
        if eos_ids.is_empty() {
            return Err(ConstraintError::InvalidConfig(
                "at least one EOS token id is required".into(),
            ));
        }
        if model_vocab_size == 0 || u32::try_from(model_vocab_size).is_err() {
            return Err(ConstraintError::InvalidConfig(format!(
                "model vocab size {model_vocab_size} out of range"
            )));
        }
        if let Some(bad) = eos_ids.iter().find(|&&id| id as usize >= model_vocab_size) {
            return Err(ConstraintError::InvalidConfig(format!(
                "EOS id {bad} is outside the model vocabulary ({model_vocab_size})"
            )));
        }
        let added_max = tokenizer
            .get_added_tokens_decoder()
            .keys()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        let tokenizer_vocab = tokenizer.get_vocab_size(false).max(added_max);
        let (words, special_tokens, unusable_tokens) =
            vocab_bytes(tokenizer, tokenizer_vocab, model_vocab_size)?;

        let mut hf = tokenizer.clone();
        hf.with_truncation(None)
            .map_err(|e| ConstraintError::UnsupportedTokenizer(e.to_string()))?;
        hf.with_padding(None);
        // toktrie asserts on malformed vocabularies; report those as errors.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let info = TokRxInfo::new(model_vocab_size as u32, eos_ids[0]);
            let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_ids);
            let env: TokEnv = Arc::new(HfTokEnv {
                tokenizer: hf,
                trie,
            });
            ParserFactory::new_simple(&env)
        }));
        let mut parser_factory = match built {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => return Err(ConstraintError::UnsupportedTokenizer(e.to_string())),
            Err(_) => {
                return Err(ConstraintError::UnsupportedTokenizer(
                    "token trie construction failed".into(),
                ));
            }
        };
        parser_factory.quiet();
        *parser_factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        let info = VocabInfo {
            tokenizer_vocab_size: tokenizer_vocab,
            model_vocab_size,
            special_tokens,
            unusable_tokens,
            build_time: start.elapsed(),
        };
        tracing::debug!(
            tokenizer_vocab,
            model_vocab_size,
            special_tokens,
            unusable_tokens,
            build_ms = info.build_time.as_millis() as u64,
            "built constraint token trie"
        );
        Ok(Self {
            inner: Arc::new(FactoryInner {
                parser_factory,
                eos_ids: eos_ids.to_vec(),
                info,
            }),
        })
    }

    /// Vocabulary statistics and build time.
    pub fn vocab_info(&self) -> VocabInfo {
        self.inner.info
    }

    /// The EOS ids given at construction.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    /// Mask length (= model vocab size).
    pub fn vocab_size(&self) -> usize {
        self.inner.info.model_vocab_size
    }

    /// Compiles `spec` into a fresh per-sequence constraint.
    pub fn create(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let grammar = match spec {
            ConstraintSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ConstraintError::InvalidSpec(
                        "JSON schema must be an object or a boolean".into(),
                    ));
                }
                // The schema compiler recurses; bound the depth so a hostile
                // schema cannot overflow the (engine thread's) stack.
                if json_depth(schema) > MAX_SCHEMA_DEPTH {
                    return Err(ConstraintError::InvalidSpec(format!(
                        "JSON schema nested deeper than {MAX_SCHEMA_DEPTH} levels"
                    )));
                }
                TopLevelGrammar::from_json_schema(compact_json(schema))
            }
            ConstraintSpec::Regex(rx) => {
                // llguidance's regex-to-lark rewrite silently drops a dangling `\`.
                let trailing = rx.bytes().rev().take_while(|&b| b == b'\\').count();
                if trailing % 2 == 1 {
                    return Err(ConstraintError::InvalidSpec(
                        "regex ends with an unterminated escape".into(),
                    ));
                }
                TopLevelGrammar::from_regex(rx)
            }
        };
        let parser = self
            .inner
            .parser_factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::InvalidSpec(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::InvalidSpec(e));
        }
        Ok(Constraint {
            matcher,
            factory: self.clone(),
            mask: None,
            tokens: 0,
        })
    }
}

/// Per-sequence grammar state.
pub struct Constraint {
    matcher: Matcher,
    factory: ConstraintFactory,
    /// Mask for the current state, cached until the next commit.
    mask: Option<TokenMask>,
    tokens: usize,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("tokens", &self.tokens)
            .field("finished", &self.is_finished())
            .field("stop_reason", &self.matcher.stop_reason())
            .finish()
    }
}

impl Constraint {
    /// Tokens allowed next (length = model vocab size). When the grammar is
    /// complete only the EOS ids are allowed; EOS is allowed exactly when the
    /// output so far is a complete match.
    pub fn allowed_tokens(&mut self) -> Result<TokenMask, ConstraintError> {
        if let Some(m) = &self.mask {
            return Ok(m.clone());
        }
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        let mask = TokenMask::from_words(vob.as_slice().to_vec(), self.factory.vocab_size());
        self.mask = Some(mask.clone());
        Ok(mask)
    }

    /// Advances the grammar by `token`. A token the grammar does not allow is
    /// rejected with [`ConstraintError::TokenRejected`] and leaves the state
    /// unchanged. Committing an EOS id once finished is a no-op.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        let is_eos = self.factory.eos_ids().contains(&token);
        if self.is_finished() {
            return if is_eos {
                Ok(())
            } else {
                Err(ConstraintError::TokenRejected { token })
            };
        }
        if let Some(e) = self.matcher.get_error() {
            return Err(ConstraintError::Matcher(e));
        }
        if token as usize >= self.factory.vocab_size() {
            return Err(ConstraintError::TokenRejected { token });
        }
        let allowed = match &self.mask {
            Some(m) => m.is_allowed(token),
            None => {
                self.matcher
                    .validate_tokens(&[token])
                    .map_err(|e| ConstraintError::Matcher(e.to_string()))?
                    == 1
            }
        };
        if !allowed {
            return Err(ConstraintError::TokenRejected { token });
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        self.mask = None;
        self.tokens += 1;
        Ok(())
    }

    /// Whether the output is a complete match and generation must stop
    /// (the grammar cannot be extended, or an EOS id was committed).
    /// `false` on matcher errors: those surface from the other methods.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
            && matches!(
                self.matcher.stop_reason(),
                StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
            )
    }

    /// Whether the output so far is a complete match (EOS would be allowed),
    /// even if it could still be extended.
    pub fn is_accepting(&mut self) -> Result<bool, ConstraintError> {
        if self.is_finished() {
            return Ok(true);
        }
        self.matcher
            .is_accepting()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))
    }

    /// Number of tokens committed so far (EOS included).
    pub fn committed_tokens(&self) -> usize {
        self.tokens
    }
}

/// Adds llguidance's compact-JSON options to a schema that sets none.
fn compact_json(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(obj) = s.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": "
            })
        });
    }
    s
}
