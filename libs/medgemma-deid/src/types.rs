//! The vocabulary: identifier types, where a span came from, spans, languages and modes.

use serde::{Deserialize, Serialize};

/// A kind of protected health information: the 18 HIPAA Safe Harbor identifiers (geographic
/// units split into street/city [`PhiType::Address`] and [`PhiType::Zip`]; dates and ages over
/// 89 apart), plus organisations and Taiwan's national ID and NHI card numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PhiType {
    /// Names of patients, relatives, clinicians (1).
    Name,
    /// Hospitals, clinics, employers and other organisations.
    Organization,
    /// Street addresses, cities, districts, counties: geographic units below a state (2).
    Address,
    /// ZIP and postal codes (2).
    Zip,
    /// Every date element but the year: dates of birth, admission, discharge, death (3).
    Date,
    /// Ages over 89 (3).
    Age,
    /// Telephone numbers (4).
    Phone,
    /// Fax numbers (5).
    Fax,
    /// Email addresses (6).
    Email,
    /// US Social Security numbers (7).
    Ssn,
    /// Medical record numbers (8).
    Mrn,
    /// Health plan beneficiary numbers (9).
    HealthPlan,
    /// Account numbers, card numbers (10).
    Account,
    /// Certificate and licence numbers (11).
    License,
    /// Vehicle identifiers: VINs, licence plates (12).
    Vehicle,
    /// Device identifiers and serial numbers (13).
    Device,
    /// Web URLs (14).
    Url,
    /// IP addresses (15).
    Ip,
    /// Biometric identifiers: finger, voice, retina prints (16).
    Biometric,
    /// Full-face photographs and comparable images (17).
    Photo,
    /// Any other unique identifying number or code (18).
    OtherId,
    /// Taiwan national ID / resident certificate numbers.
    NationalId,
    /// Taiwan National Health Insurance card numbers.
    NhiCard,
}

impl PhiType {
    /// Every type, in declaration order.
    pub const ALL: [PhiType; 23] = [
        PhiType::Name,
        PhiType::Organization,
        PhiType::Address,
        PhiType::Zip,
        PhiType::Date,
        PhiType::Age,
        PhiType::Phone,
        PhiType::Fax,
        PhiType::Email,
        PhiType::Ssn,
        PhiType::Mrn,
        PhiType::HealthPlan,
        PhiType::Account,
        PhiType::License,
        PhiType::Vehicle,
        PhiType::Device,
        PhiType::Url,
        PhiType::Ip,
        PhiType::Biometric,
        PhiType::Photo,
        PhiType::OtherId,
        PhiType::NationalId,
        PhiType::NhiCard,
    ];

    /// The type's name: `NAME`, `HEALTH_PLAN`, ... (the tag of REDACT mode, the corpus label,
    /// the model pass's enum).
    pub fn as_str(self) -> &'static str {
        match self {
            PhiType::Name => "NAME",
            PhiType::Organization => "ORGANIZATION",
            PhiType::Address => "ADDRESS",
            PhiType::Zip => "ZIP",
            PhiType::Date => "DATE",
            PhiType::Age => "AGE",
            PhiType::Phone => "PHONE",
            PhiType::Fax => "FAX",
            PhiType::Email => "EMAIL",
            PhiType::Ssn => "SSN",
            PhiType::Mrn => "MRN",
            PhiType::HealthPlan => "HEALTH_PLAN",
            PhiType::Account => "ACCOUNT",
            PhiType::License => "LICENSE",
            PhiType::Vehicle => "VEHICLE",
            PhiType::Device => "DEVICE",
            PhiType::Url => "URL",
            PhiType::Ip => "IP",
            PhiType::Biometric => "BIOMETRIC",
            PhiType::Photo => "PHOTO",
            PhiType::OtherId => "OTHER_ID",
            PhiType::NationalId => "NATIONAL_ID",
            PhiType::NhiCard => "NHI_CARD",
        }
    }

    /// The type named `s` (as [`PhiType::as_str`] writes it; case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl std::fmt::Display for PhiType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which pass found a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A deterministic recognizer.
    Rule,
    /// The model pass.
    Model,
    /// Both.
    Both,
}

impl Source {
    /// `rule`, `model` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Rule => "rule",
            Source::Model => "model",
            Source::Both => "both",
        }
    }
}

/// One identifier found in a text. Offsets are into the input, end exclusive: `start`/`end`
/// count Unicode code points, `byte_start`/`byte_end` UTF-8 bytes; both name the same
/// characters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// First code point.
    pub start: usize,
    /// One past the last code point.
    pub end: usize,
    /// First byte.
    pub byte_start: usize,
    /// One past the last byte.
    pub byte_end: usize,
    /// What it is.
    #[serde(rename = "type")]
    pub phi_type: PhiType,
    /// Who found it.
    pub source: Source,
    /// How sure the finder is, in (0, 1].
    pub confidence: f32,
}

impl Span {
    /// The characters it names.
    pub fn text<'a>(&self, input: &'a str) -> &'a str {
        &input[self.byte_start..self.byte_end]
    }
}

/// The language of a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Language {
    /// English.
    #[serde(rename = "en")]
    En,
    /// Traditional Chinese (Taiwan).
    #[serde(rename = "zh-TW")]
    ZhTw,
}

impl Language {
    /// `en` or `zh-TW`.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::En => "en",
            Language::ZhTw => "zh-TW",
        }
    }

    /// `en`, `zh-TW` (also `zh-Hant`, `zh-Hant-TW`, `zh`), case-insensitive. `auto` and the
    /// empty string are [`Language::detect`]'s business: `None` here.
    pub fn parse(tag: &str) -> Option<Self> {
        match tag.trim().to_ascii_lowercase().as_str() {
            "en" | "en-us" | "en-gb" => Some(Language::En),
            "zh-tw" | "zh-hant" | "zh-hant-tw" | "zh" => Some(Language::ZhTw),
            _ => None,
        }
    }

    /// Traditional Chinese when at least 20% of the letters are Han characters, else English.
    pub fn detect(text: &str) -> Self {
        let (mut han, mut letters) = (0usize, 0usize);
        for c in text.chars() {
            if is_han(c) {
                han += 1;
                letters += 1;
            } else if c.is_alphabetic() {
                letters += 1;
            }
        }
        if letters > 0 && han * 5 >= letters {
            Language::ZhTw
        } else {
            Language::En
        }
    }
}

/// Whether `c` is a CJK ideograph.
pub fn is_han(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x3134F)
}

/// How identifiers are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By a tag naming the type: `[NAME]`, `[DATE]`.
    Redact,
    /// Every character by this one (`*`).
    Mask(char),
    /// By realistic fakes, consistent within the text: the same value always gets the same
    /// fake, dates move by one offset, ages over 89 become "90 or older". `seed` fixes the
    /// fakes and the offset.
    Surrogate {
        /// The seed of the fakes.
        seed: u64,
    },
}
