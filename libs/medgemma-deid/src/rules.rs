//! The deterministic recognizers: patterns with checksums where the identifier has one (US SSN
//! rules, the Taiwan ID checksum, Luhn, DEA), context words ("MRN", "病歷號", "fax", "傳真"),
//! dates in English, ISO and ROC forms, names after titles and labels in both languages,
//! addresses, organisations. They read the normalised text ([`crate::normalize`]) and answer
//! byte ranges into it.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;

use crate::lexicon;
use crate::types::{PhiType, is_han};

/// A recognizer's finding: a byte range of the normalised text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cand {
    pub start: usize,
    pub end: usize,
    pub ty: PhiType,
    pub conf: f32,
}

/// How a context-led identifier looks.
#[derive(Debug, Clone, Copy)]
enum IdShape {
    /// Letters, digits, `-`, `/`, `.`; at least one digit.
    Code,
    /// Twelve digits, optionally in groups of four (NHI cards).
    Twelve,
    /// A licence plate (one inner space or dash allowed).
    Plate,
    /// A phone number (digits, spaces, dashes, dots, parentheses, `+`, extension).
    PhoneNumber,
    /// A code or a file name.
    File,
}

struct ContextRule {
    re: Regex,
    ty: PhiType,
    shape: IdShape,
}

/// Separator between a context word and its value: `: `, ` number `, ` #`, `為`, ...
const SEP: &str = r"[ \t]*(?:(?i:numbers?|nos?\.?|num\.?|#|ids?|is|was|of)[ \t]*)?(?:[:：#=(]|為|是)?[ \t]*(?:#[ \t]*)?";

fn id_pattern(shape: IdShape) -> &'static str {
    match shape {
        IdShape::Code => r"[A-Za-z0-9][A-Za-z0-9\-/.]{2,30}",
        IdShape::Twelve => r"\d{4}[ \-]?\d{4}[ \-]?\d{4}",
        IdShape::Plate => r"[A-Za-z0-9]{1,8}(?:[\- ][A-Za-z0-9]{1,5})?",
        IdShape::PhoneNumber => {
            r"\+?[\d(][\d()\-. ]{5,18}\d(?:[ \t]*(?:x|ext\.?|#|分機)[ \t]*\d{1,5})?"
        }
        IdShape::File => r"[A-Za-z0-9][A-Za-z0-9_\-/.]{2,40}",
    }
}

fn context_rule(ctx: &str, ty: PhiType, shape: IdShape) -> ContextRule {
    let pat = format!(
        r"(?:(?i:(?-u:\b)(?:{ctx})))(?:{SEP})(?P<id>{})",
        id_pattern(shape)
    );
    ContextRule {
        re: Regex::new(&pat).unwrap_or_else(|e| panic!("context rule {ty}: {e}")),
        ty,
        shape,
    }
}

/// Chinese context words have no word boundary before them.
fn context_rule_zh(ctx: &str, ty: PhiType, shape: IdShape) -> ContextRule {
    let pat = format!(r"(?:{ctx})(?:{SEP})(?P<id>{})", id_pattern(shape));
    ContextRule {
        re: Regex::new(&pat).unwrap_or_else(|e| panic!("context rule {ty}: {e}")),
        ty,
        shape,
    }
}

fn re(p: &str) -> Regex {
    Regex::new(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

const MONTHS: &str = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
const WEEKDAY: &str = r"(?:(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day,?[ \t]+)?";
/// One word of an English name.
const NAMEW: &str = r"(?:O['’]\p{Lu}\p{Ll}+|Mc\p{Lu}\p{Ll}+|\p{Lu}[\p{Ll}\p{Mn}]+(?:['’\-]\p{Lu}?[\p{Ll}\p{Mn}]+)*|\p{Lu}\.)";

/// Every compiled recognizer.
pub struct Rules {
    context: Vec<ContextRule>,
    email: Regex,
    url: Regex,
    ipv4: Regex,
    ipv6: Regex,
    mac: Regex,
    ssn: Regex,
    tw_id: Regex,
    phone_us: Regex,
    phone_tw_mobile: Regex,
    phone_tw_land: Regex,
    date_num: Regex,
    date_md_ctx: Regex,
    date_month_first: Regex,
    date_day_first: Regex,
    date_dmy_abbr: Regex,
    date_zh: Regex,
    date_zh_md: Regex,
    age_en: Regex,
    age_label: Regex,
    age_zh: Regex,
    zip_state: Regex,
    zip_ctx: Regex,
    street_en: Regex,
    city_state_zip: Regex,
    city_ctx: Regex,
    county: Regex,
    addr_zh: Regex,
    city_zh: Regex,
    name_title: Regex,
    name_label: Regex,
    name_suffix: Regex,
    name_verb: Regex,
    name_zh_label: Regex,
    name_zh_title: Regex,
    org_en: Regex,
    org_company: Regex,
    org_ctx: Regex,
    org_zh: Regex,
    org_zh_ctx: Regex,
    card: Regex,
    dea: Regex,
    vin: Regex,
    udi: Regex,
    photo_file: Regex,
    long_number: Regex,
    letters_digits: Regex,
    not_names: HashSet<&'static str>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").finish_non_exhaustive()
    }
}

/// The compiled recognizers (built once).
pub static RULES: LazyLock<Rules> = LazyLock::new(Rules::new);

impl Rules {
    // Longer than 120 lines on purpose: a flat table of the compiled patterns, one per
    // recognizer, read top to bottom beside `find`; splitting it would scatter the table.
    fn new() -> Self {
        use IdShape::*;
        use PhiType::*;
        let context = vec![
            context_rule(
                r"mrn|mr#|mr[ \t]#|medical[ \t]record(?:[ \t]number|[ \t]no\.?)?|chart(?:[ \t]number|[ \t]no\.?|[ \t]#)|hospital[ \t](?:number|no\.?|#)|unit[ \t]number",
                Mrn,
                Code,
            ),
            context_rule_zh("病歷號碼|病歷號|病歷編號|病歷|病例號", Mrn, Code),
            context_rule(
                r"member(?:[ \t]id|[ \t]number|[ \t]#)|policy(?:[ \t]number|[ \t]no\.?|[ \t]#|[ \t]id)?|insurance(?:[ \t]id|[ \t]number|[ \t]no\.?)|subscriber(?:[ \t]id|[ \t]number)?|health[ \t]plan(?:[ \t]id|[ \t]number|[ \t]no\.?)?|medicare(?:[ \t]id|[ \t]number|[ \t]no\.?)?|medicaid(?:[ \t]id|[ \t]number|[ \t]no\.?)?|beneficiary(?:[ \t]id|[ \t]number|[ \t]no\.?)?|group(?:[ \t]number|[ \t]no\.?|[ \t]#)",
                HealthPlan,
                Code,
            ),
            context_rule_zh(
                "保單號碼|保單號|保險證號|保險卡號|保險號碼|保險單號|商業保險",
                HealthPlan,
                Code,
            ),
            context_rule(
                r"nhi[ \t]card(?:[ \t]number|[ \t]no\.?)?|ic[ \t]card(?:[ \t]number|[ \t]no\.?)?",
                NhiCard,
                Twelve,
            ),
            context_rule_zh("健保卡號碼|健保卡號|健保卡卡號|健保卡", NhiCard, Twelve),
            context_rule(
                r"account(?:[ \t]number|[ \t]no\.?|[ \t]#)?|acct\.?(?:[ \t]no\.?|[ \t]#)?|billing(?:[ \t]number|[ \t]no\.?|[ \t]id|[ \t]#)|bank[ \t]account|iban",
                Account,
                Code,
            ),
            context_rule_zh("帳號|帳戶號碼|帳戶|銀行帳號|批價號碼|批價號", Account, Code),
            context_rule(
                r"licen[cs]e(?:[ \t]number|[ \t]no\.?|[ \t]#)?|dea(?:[ \t]number|[ \t]no\.?|[ \t]#)?|npi(?:[ \t]number|[ \t]no\.?)?|certificate(?:[ \t]number|[ \t]no\.?|[ \t]#)?|driver'?s[ \t]licen[cs]e(?:[ \t]number|[ \t]no\.?)?|board[ \t]certification",
                License,
                Code,
            ),
            context_rule_zh(
                "醫師證書字號|證書字號|證書號碼|執照號碼|駕照號碼|駕照|執照|醫事人員證號|證號",
                License,
                Code,
            ),
            context_rule(
                r"vin|vehicle[ \t]identification(?:[ \t]number)?|licen[cs]e[ \t]plate(?:[ \t]number|[ \t]no\.?)?|plate(?:[ \t]number|[ \t]no\.?)?|tag[ \t]number",
                Vehicle,
                Plate,
            ),
            context_rule_zh("車牌號碼|車牌號|車牌|車號|車身號碼", Vehicle, Plate),
            context_rule(
                r"vin|vehicle[ \t]identification(?:[ \t]number)?",
                Vehicle,
                Code,
            ),
            context_rule(
                r"serial(?:[ \t]number|[ \t]no\.?|[ \t]#)?|s/n|sn|device(?:[ \t]id|[ \t]identifier|[ \t]serial)|udi|implant(?:[ \t]id|[ \t]serial)|pacemaker(?:[ \t]serial|[ \t]id)|model/serial",
                Device,
                Code,
            ),
            context_rule_zh(
                "序號|序列號|裝置編號|器材序號|器材編號|裝置序號|儀器編號",
                Device,
                Code,
            ),
            context_rule(
                r"fingerprint(?:[ \t]id|[ \t]scan|[ \t]record|[ \t]template)?|retina(?:l)?[ \t]scan(?:[ \t]id)?|iris[ \t]scan(?:[ \t]id)?|voice[ \t]?print(?:[ \t]id)?|palm[ \t]?print(?:[ \t]id)?|biometric(?:[ \t]id|[ \t]identifier|[ \t]template|[ \t]record)?|facial[ \t]recognition(?:[ \t]id)?",
                Biometric,
                Code,
            ),
            context_rule_zh(
                "指紋編號|指紋紀錄|指紋檔案|指紋|虹膜編號|虹膜掃描|虹膜|聲紋編號|聲紋|掌紋編號|掌紋|生物特徵編號|生物特徵",
                Biometric,
                Code,
            ),
            context_rule(
                r"(?:full[ \t\-]face[ \t])?photo(?:graph)?(?:[ \t]id|[ \t]file|[ \t]on[ \t]file)?|facial[ \t]photo(?:graph)?|image[ \t]file|headshot",
                Photo,
                File,
            ),
            context_rule_zh(
                "相片編號|相片檔案|相片|照片編號|照片檔案|照片檔名|照片|大頭照|臉部照片",
                Photo,
                File,
            ),
            context_rule(
                r"passport(?:[ \t]number|[ \t]no\.?|[ \t]#)?|case(?:[ \t]number|[ \t]no\.?|[ \t]#|[ \t]id)|accession(?:[ \t]number|[ \t]no\.?|[ \t]#)?|specimen(?:[ \t]id|[ \t]number|[ \t]no\.?)|encounter(?:[ \t]id|[ \t]number|[ \t]no\.?)|visit(?:[ \t]id|[ \t]number|[ \t]no\.?)|claim(?:[ \t]number|[ \t]no\.?|[ \t]#)|employee(?:[ \t]id|[ \t]number)|student[ \t]id|patient[ \t]id|study[ \t]id|order(?:[ \t]number|[ \t]no\.?|[ \t]#)|requisition(?:[ \t]number|[ \t]no\.?|[ \t]#)?",
                OtherId,
                Code,
            ),
            context_rule_zh(
                "護照號碼|護照|個案編號|檢體編號|就醫序號|住院號|掛號號碼|員工編號|學號|申請單號|檢查單號|單號|編號",
                OtherId,
                Code,
            ),
            context_rule(
                r"ssn|social[ \t]security(?:[ \t]number|[ \t]no\.?|[ \t]#)?",
                Ssn,
                Code,
            ),
            context_rule(
                r"national[ \t]id|taiwan[ \t]id|resident[ \t]certificate|arc[ \t]number|id[ \t]number",
                NationalId,
                Code,
            ),
            context_rule_zh(
                "身分證字號|身份證字號|身分證號碼|身份證號碼|身分證號|身份證號|身分證|身份證|統一證號|居留證號碼|居留證號",
                NationalId,
                Code,
            ),
            context_rule(
                r"fax(?:[ \t]number|[ \t]no\.?)?|facsimile",
                Fax,
                PhoneNumber,
            ),
            context_rule_zh("傳真號碼|傳真", Fax, PhoneNumber),
            context_rule(
                r"phone(?:[ \t]number)?|tel\.?|telephone|cell(?:[ \t]phone)?|mobile(?:[ \t]phone)?|home[ \t]phone|work[ \t]phone|pager|contact[ \t]number|call[ \t]back[ \t]number",
                Phone,
                PhoneNumber,
            ),
            context_rule_zh(
                "聯絡電話|連絡電話|行動電話|家用電話|住家電話|電話號碼|電話|手機號碼|手機|市話",
                Phone,
                PhoneNumber,
            ),
            context_rule(r"zip(?:[ \t]code)?|postal[ \t]code|postcode", Zip, Code),
            context_rule_zh("郵遞區號|郵遞區號碼|郵區", Zip, Code),
        ];
        let states = lexicon::STATE_CODES.join("|");
        let suffixes = lexicon::STREET_SUFFIXES.join("|");
        let surnames = format!(
            "(?:{}|[{}])",
            lexicon::COMPOUND_SURNAMES.join("|"),
            lexicon::SURNAMES
        );
        let cities_zh = lexicon::TW_CITIES.join("|");
        let name_seq = format!(r"{NAMEW}(?:[ \t]+{NAMEW}){{0,2}}");
        Self {
            context,
            email: re(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"),
            url: re(r#"(?i:https?://|ftp://|www\.)[^\s<>"'，。、；）)\]}\p{Han}]+"#),
            ipv4: re(r"(?-u:\b)(?:\d{1,3}\.){3}\d{1,3}(?-u:\b)"),
            ipv6: re(
                r"(?i)(?-u:\b)(?:(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}|(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4})(?-u:\b)",
            ),
            mac: re(r"(?i)(?-u:\b)(?:[0-9a-f]{2}[:\-]){5}[0-9a-f]{2}(?-u:\b)"),
            ssn: re(r"(?-u:\b)\d{3}-\d{2}-\d{4}(?-u:\b)"),
            tw_id: re(r"(?-u:\b)[A-Z][12890ABCD]\d{8}(?-u:\b)"),
            phone_us: re(
                r"(?:(?:\+1|(?-u:\b)001)[\-. ]?|(?-u:\b)1[\-. ])?(?:\(\d{3}\)[ ]?|(?-u:\b)\d{3}[\-. ])\d{3}[\-. ]\d{4}(?:[ ]?(?:x|ext\.?|extension)[ ]?\d{1,5})?(?-u:\b)",
            ),
            phone_tw_mobile: re(
                r"(?:\+886[\- ]?9\d{2}|(?-u:\b)09\d{2})[\- ]?\d{3}[\- ]?\d{3}(?-u:\b)",
            ),
            phone_tw_land: re(
                r"(?:\(0\d{1,2}\)[ ]?|(?-u:\b)0\d{1,2}-|\+886[\- ]?\d{1,2}[\- ])\d{3,4}[\- ]?\d{4}(?:[ ]?(?:#|分機|ext\.?)[ ]?\d{1,5})?(?-u:\b)",
            ),
            date_num: re(
                r"(?-u:\b)(?:民國[ \t]*)?(?P<a>\d{1,4})(?P<s1>[/.\-])(?P<b>\d{1,2})(?P<s2>[/.\-])(?P<c>\d{1,4})(?-u:\b)",
            ),
            date_md_ctx: re(
                r"(?i:(?-u:\b)(?:on|since|dated|from|until|till|through|by|starting|admitted|discharged|seen)[ \t]+)(?P<d>(?P<m>\d{1,2})/(?P<dd>\d{1,2}))(?-u:\b)",
            ),
            date_month_first: re(&format!(
                r"(?-u:\b){WEEKDAY}{MONTHS}\.?[ \t]+(?:\d{{1,2}}(?:st|nd|rd|th)?(?:,?[ \t]+\d{{4}})?|\d{{4}})(?-u:\b)"
            )),
            date_day_first: re(&format!(
                r"(?-u:\b){WEEKDAY}(?:the[ \t]+)?\d{{1,2}}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?{MONTHS}\.?(?:,?[ \t]+\d{{4}})?(?-u:\b)"
            )),
            date_dmy_abbr: re(
                r"(?i)(?-u:\b)\d{1,2}[\- ](?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[\- ]\d{2,4}(?-u:\b)",
            ),
            date_zh: re(
                r"(?:民國|西元|公元)?[ \t]*(?P<y>\d{2,4}|[〇○零一二三四五六七八九]{2,4})[ \t]*年[ \t]*(?P<m>\d{1,2}|[一二三四五六七八九十]{1,3})[ \t]*月(?:[ \t]*(?P<d>\d{1,2}|[一二三四五六七八九十]{1,3})[ \t]*[日號号])?",
            ),
            date_zh_md: re(
                r"(?P<m>\d{1,2}|[一二三四五六七八九十]{1,3})[ \t]*月[ \t]*(?P<d>\d{1,2}|[一二三四五六七八九十]{1,3})[ \t]*[日號号]",
            ),
            age_en: re(
                r"(?i)(?-u:\b)(?:9\d|1[01]\d)(?:[ \-](?:year|yr)s?[ \-]old|[ ]?(?:y/o|yo|y\.o\.)|[ ]?(?:year|yr)s?[ \-]of[ \-]age)(?-u:\b)",
            ),
            age_label: re(r"(?i:(?-u:\b)(?:aged?|age[ \t]*:))[ \t]*(?P<n>9\d|1[01]\d)(?-u:\b)"),
            age_zh: re(
                r"(?:(?-u:\b)(?:9\d|1[01]\d)|九十[一二三四五六七八九]?|一百(?:零?[一二三四五六七八九十]{1,2})?)[ \t]*歲|(?:年齡|年紀|享壽|高齡|享年)[ \t:：]*(?P<n>(?:9\d|1[01]\d)(?:[ \t]*歲)?)",
            ),
            zip_state: re(&format!(
                r"(?-u:\b)(?:{states})[ \t]+(?P<zip>\d{{5}}(?:-\d{{4}})?)(?-u:\b)"
            )),
            zip_ctx: re(r"(?:郵遞區號|郵區)[ \t:：]*(?P<zip>\d{3,6})"),
            street_en: re(&format!(
                r"(?-u:\b)\d{{1,6}}(?:-\d{{1,4}})?[ \t]+(?:(?:[NSEW]\.?|North|South|East|West)[ \t]+)?(?:(?:[A-Z][A-Za-z'’.\-]*|\d{{1,3}}(?:st|nd|rd|th))[ \t]+){{1,4}}(?:{suffixes})\.?(?-u:\b)(?:[ \t]+(?:NE|NW|SE|SW|N|S|E|W)(?-u:\b))?(?:,?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Room|Rm\.?|Floor|Fl\.?|Bldg\.?|Building|#)[ \t]*#?[A-Za-z0-9\-]+)?"
            )),
            // "City, ST 12345", or "City, ST" after a street address or "in".
            city_state_zip: re(&format!(
                r"(?:(?-u:\b)(?P<city>[A-Z][a-z][A-Za-z'\-]*(?:[ \t]+[A-Z][a-z][A-Za-z'\-]*){{0,2}}),[ \t]*(?:{states})[ \t]+(?P<zip>\d{{5}}(?:-\d{{4}})?)|(?:(?:{suffixes})\.?,?|Apt\.?[ \t]+\w+,?|Suite[ \t]+\w+,?|[ \t]in|[ \t]at)[ \t]+(?P<city2>[A-Z][a-z][A-Za-z'\-]*(?:[ \t]+[A-Z][a-z][A-Za-z'\-]*){{0,2}}),[ \t]*(?:{states}))(?-u:\b)"
            )),
            city_ctx: re(
                r"(?i:(?-u:\b)(?:lives|living|resides|residing|resident|moved|relocated|born|home|town|city|hometown|native|travell?ed|returned|visiting|grew[ \t]up)(?:[ \t]+(?:in|of|to|from|at))?)[ \t]+(?P<city>[A-Z][a-z][A-Za-z'.\-]*(?:[ \t]+[A-Z][a-z][A-Za-z'.\-]*){0,2})",
            ),
            county: re(
                r"(?-u:\b)[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+)?[ \t]+(?:County|Parish|Township|Borough)(?-u:\b)",
            ),
            addr_zh: re(
                r"(?:(?P<zip>(?-u:\b)\d{3}(?:\d{2,3})?)[ \t]?)?(?P<addr>[\p{Han}A-Za-z]{1,16}?(?:路|街|大道|巷)(?:[一二三四五六七八九十\d]{1,3}段)?(?:\d{1,4}巷)?(?:\d{1,4}弄)?\d{1,5}號(?:之\d{1,3})?(?:\d{1,3}樓(?:之\d{1,3})?)?(?:\d{1,4}室)?)",
            ),
            city_zh: re(&format!(
                r"(?:{cities_zh})(?:[\p{{Han}}]{{1,3}}?(?:區|鄉|鎮|市))?"
            )),
            name_title: re(&format!(
                r"(?-u:\b)(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Fr|Rev)\.?[ \t]+(?P<n>{name_seq})"
            )),
            name_label: re(&format!(
                r"(?i:(?-u:\b)(?:patient(?:'s)?[ \t]name|patient|pt|name|seen[ \t]by|attending(?:[ \t]physician)?|physician|surgeon|resident|intern|nurse|np|pa-c|pcp|primary[ \t]care[ \t](?:physician|provider)|signed(?:[ \t]electronically)?(?:[ \t]by)?|electronically[ \t]signed(?:[ \t]by)?|dictated[ \t]by|transcribed[ \t]by|referred[ \t]by|referring[ \t](?:physician|provider)|cc|emergency[ \t]contact|contact[ \t]person|next[ \t]of[ \t]kin|nok|guardian|caregiver|spouse|wife|husband|partner|son|daughter|mother|father|sister|brother|friend|neighbou?r|interpreter|witness|consultant|provider|informant|examiner|reported[ \t]by|verified[ \t]by|reviewed[ \t]by|approved[ \t]by)(?-u:\b))[ \t]*(?:is|was|[:：,\-])?[ \t]*(?P<n>{name_seq})"
            )),
            name_suffix: re(&format!(
                r"(?-u:\b)(?P<n>{name_seq}),?[ \t]+(?:MD|M\.D\.|DO|D\.O\.|RN|NP|PA-C|PhD|MSN|BSN|DNP|FNP|APRN|PharmD|DDS|FACC|FACP|MBBS)(?-u:\b)"
            )),
            name_verb: re(&format!(
                r"(?-u:\b)(?P<n>{NAMEW}[ \t]+{NAMEW}(?:[ \t]+{NAMEW})?)[ \t]+(?:is[ \t]an?|was[ \t]an?|reports|reported|states|stated|denies|denied|presents|presented|complains|complained|returns|returned|arrived|was[ \t]seen|was[ \t]admitted|has[ \t]been|notes|noted|underwent|tolerated|agrees|agreed|lives|called|came|visited)(?-u:\b)"
            )),
            name_zh_label: re(&format!(
                r"(?:姓名|病患|病人|患者|個案|案主|家屬|聯絡人|緊急聯絡人|主治醫師|主治醫生|住院醫師|醫師|醫生|護理師|護士|藥師|簽名|簽章|記錄者|紀錄者|負責人|配偶|丈夫|妻子|兒子|女兒|母親|父親|哥哥|姊姊|姐姐|弟弟|妹妹|看護|照顧者|轉介者|個管師|營養師|治療師|檢查者|報告者|填表人|申請人|委託人|陪同者)[ \t]*[:：]?[ \t]*(?P<n>{surnames}[\p{{Han}}]{{1,2}})"
            )),
            name_zh_title: re(&format!(
                r"(?P<n>{surnames}[\p{{Han}}]{{0,2}}?)(?:先生|女士|小姐|醫師|醫生|護理師|主任|院長|教授|太太|阿姨|伯伯|阿嬤|阿公|奶奶|爺爺|同學|老師|個管師|藥師|營養師)"
            )),
            org_en: re(
                r"(?-u:\b)(?P<o>(?:St\.|Saint|Mt\.|[A-Z][A-Za-z'’&\-]*)(?:[ \t]+(?:of|the|and|&|for|de|la|St\.|[A-Z][A-Za-z'’&\-]*)){0,6}?(?:[ \t]+(?:Hospital|Medical[ \t]Center|Medical[ \t]Centre|Health[ \t]Center|Health[ \t]Centre|Health[ \t]System|Healthcare|Health[ \t]Care|Clinic|Clinics|Infirmary|Hospice|Nursing[ \t]Home|Nursing[ \t]Facility|Rehabilitation[ \t]Center|Surgery[ \t]Center|Surgical[ \t]Center|Urgent[ \t]Care|Pharmacy|Laboratory|Laboratories|Labs|University|College|Institute|Foundation|Medical[ \t]Group|Associates|Cancer[ \t]Center|Memorial))+(?:[ \t]+of[ \t]+(?:the[ \t]+)?[A-Z][A-Za-z]+(?:[ \t]+[A-Z][A-Za-z]+){0,2})?)(?-u:\b)",
            ),
            org_company: re(
                r"(?-u:\b)(?P<o>[A-Z][a-z]+(?:(?:-|,[ \t]|[ \t])[A-Z][a-z]+){0,3}(?:,?[ \t]+(?:and|&)[ \t]+[A-Z][a-z]+)?[ \t]+(?:Inc\.?|LLC|L\.L\.C\.|Ltd\.?|PLC|Corp\.?|Corporation|Group|Company|Co\.|Partners|Holdings|Industries|Enterprises))",
            ),
            org_ctx: re(
                r"(?i:(?-u:\b)(?:works?[ \t](?:at|for)|works?[ \t]as[ \t]an?[ \t][a-z \t]{2,40}?[ \t](?:at|for)|worked[ \t](?:at|for)|working[ \t](?:at|for)|employed[ \t](?:at|by|with)|employer(?:[ \t]is)?|retired[ \t]from|job[ \t]at|insured[ \t](?:by|through)|insurer|insurance[ \t]carrier)[ \t]*[:：]?)[ \t]*(?P<o>[A-Z][A-Za-z'’&.\-]+(?:(?:,[ \t]|[ \t]|-)(?:and[ \t]|&[ \t])?[A-Z][A-Za-z'’&.\-]+){0,5})",
            ),
            org_zh: re(
                r"(?P<o>[\p{Han}A-Za-z()]{1,20}?(?:醫學中心|醫療中心|醫院|診所|衛生所|長照中心|護理之家|安養中心|養護中心|藥局|檢驗所|大學|學院|有限公司|公司|銀行|協會|基金會))",
            ),
            org_zh_ctx: re(
                r"(?:任職於|服務於|工作於|就職於|受僱於|受雇於|任職|服務單位|工作單位|雇主|公司名稱|投保單位)[ \t]*[:：]?[ \t]*(?P<o>[\p{Han}A-Za-z0-9!！&()]{2,20})",
            ),
            card: re(r"(?-u:\b)\d(?:[ \-]?\d){12,18}(?-u:\b)"),
            dea: re(r"(?-u:\b)[ABCDEFGHJKLMPRSTUX][A-Z9]\d{7}(?-u:\b)"),
            vin: re(r"(?-u:\b)[A-HJ-NPR-Z0-9]{17}(?-u:\b)"),
            udi: re(r"\(01\)\d{14}(?:\(\d{2,4}\)[A-Za-z0-9\-]+)*"),
            photo_file: re(
                r"(?i)(?-u:\b)[A-Za-z0-9_\-]+\.(?:jpe?g|png|heic|bmp|tiff?|gif)(?-u:\b)",
            ),
            long_number: re(r"(?-u:\b)\d{7,}(?-u:\b)"),
            letters_digits: re(r"(?-u:\b)[A-Z]{1,4}-?\d{5,}[A-Z]?(?-u:\b)"),
            not_names: lexicon::NOT_NAMES.iter().copied().collect(),
        }
    }

    /// Every finding in `text` (unresolved: findings may overlap), one recognizer group after
    /// another in the order of the table in `new`.
    pub fn find(&self, text: &str) -> Vec<Cand> {
        let mut out = Vec::new();
        self.find_context_ids(text, &mut out);
        self.find_web(text, &mut out);
        if text.bytes().any(|b| b.is_ascii_digit()) {
            self.find_numeric(text, &mut out);
        }
        self.find_devices(text, &mut out);
        self.find_dates_en(text, &mut out);
        self.find_addresses_en(text, &mut out);
        self.find_names_en(text, &mut out);
        self.find_orgs_en(text, &mut out);
        if text.chars().any(is_han) {
            self.find_chinese(text, &mut out);
        }
        out
    }

    /// Context-led identifiers (a label such as "MRN" or "phone", then the id).
    fn find_context_ids(&self, text: &str, out: &mut Vec<Cand>) {
        for rule in &self.context {
            for c in rule.re.captures_iter(text) {
                let m = c.name("id").expect("id group");
                let (s, e) = trim_id(text, m.start(), m.end(), rule.shape);
                let v = &text[s..e];
                let digits = v.bytes().filter(u8::is_ascii_digit).count();
                let ok = match rule.shape {
                    IdShape::Code | IdShape::File => {
                        digits >= 2 || (matches!(rule.shape, IdShape::File) && v.contains('.'))
                    }
                    IdShape::Twelve => digits == 12,
                    IdShape::Plate => {
                        digits >= 1 && v.len() >= 4 && !is_plain_word(v) && !v.contains("  ")
                    }
                    IdShape::PhoneNumber => (7..=15).contains(&digits),
                };
                if ok {
                    push(out, s, e, rule.ty, 0.9);
                }
            }
        }
    }

    /// E-mail addresses and URLs.
    fn find_web(&self, text: &str, out: &mut Vec<Cand>) {
        for m in self.email.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Email, 0.99);
        }
        for m in self.url.find_iter(text) {
            let e = m.start()
                + text[m.start()..m.end()]
                    .trim_end_matches(['.', ',', ';', ':', '!', '?'])
                    .len();
            push(out, m.start(), e, PhiType::Url, 0.97);
        }
    }

    /// IP and MAC addresses, vehicle ids, photo file names.
    fn find_devices(&self, text: &str, out: &mut Vec<Cand>) {
        for m in self.ipv6.find_iter(text) {
            let v = m.as_str();
            // "10:30:00" is a time; an address has letters or many groups.
            if v.matches(':').count() >= 3 {
                push(out, m.start(), m.end(), PhiType::Ip, 0.9);
            }
        }
        for m in self.mac.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Device, 0.85);
        }
        for m in self.vin.find_iter(text) {
            let v = m.as_str().as_bytes();
            let digits = v.iter().filter(|b| b.is_ascii_digit()).count();
            if digits >= 3 && v.len() - digits >= 3 {
                push(out, m.start(), m.end(), PhiType::Vehicle, 0.8);
            }
        }
        for m in self.photo_file.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Photo, 0.6);
        }
    }

    /// English dates with month names.
    fn find_dates_en(&self, text: &str, out: &mut Vec<Cand>) {
        for re in [
            &self.date_month_first,
            &self.date_day_first,
            &self.date_dmy_abbr,
        ] {
            for m in re.find_iter(text) {
                push(out, m.start(), m.end(), PhiType::Date, 0.9);
            }
        }
    }

    /// Addresses (English): streets, city-state-zip, cities after a cue, counties.
    fn find_addresses_en(&self, text: &str, out: &mut Vec<Cand>) {
        for m in self.street_en.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Address, 0.85);
        }
        for c in self.city_state_zip.captures_iter(text) {
            if let Some(city) = c.name("city").or_else(|| c.name("city2")) {
                push(out, city.start(), city.end(), PhiType::Address, 0.8);
            }
            if let Some(z) = c.name("zip") {
                push(out, z.start(), z.end(), PhiType::Zip, 0.9);
            }
        }
        for c in self.city_ctx.captures_iter(text) {
            let city = c.name("city").expect("city");
            let (s, e) = strip_leading(text, city.start(), city.end(), ORG_NOT_FIRST);
            if !COUNTRIES.contains(&&text[s..e]) {
                push(out, s, e, PhiType::Address, 0.7);
            }
        }
        for m in self.county.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Address, 0.8);
        }
    }

    /// Names (English): after a title, a label, before a suffix, before a verb.
    fn find_names_en(&self, text: &str, out: &mut Vec<Cand>) {
        for (re, conf) in [
            (&self.name_title, 0.85),
            (&self.name_label, 0.8),
            (&self.name_suffix, 0.85),
            (&self.name_verb, 0.7),
        ] {
            for c in re.captures_iter(text) {
                let n = c.name("n").expect("n");
                let (s, e) = strip_words(text, n.start(), n.end(), &self.not_names);
                if e > s && text[s..e].chars().filter(|c| c.is_alphabetic()).count() >= 2 {
                    push(out, s, e, PhiType::Name, conf);
                }
            }
        }
    }

    /// Organisations (English).
    fn find_orgs_en(&self, text: &str, out: &mut Vec<Cand>) {
        for re in [&self.org_en, &self.org_company] {
            for c in re.captures_iter(text) {
                let o = c.name("o").expect("o");
                let (s, e) = strip_leading(text, o.start(), o.end(), ORG_NOT_FIRST);
                if e > s && !is_department(&text[s..e]) && text[s..e].contains(' ') {
                    push(out, s, e, PhiType::Organization, 0.75);
                }
            }
        }
        for c in self.org_ctx.captures_iter(text) {
            let o = c.name("o").expect("o");
            push(out, o.start(), o.end(), PhiType::Organization, 0.75);
        }
    }
}

/// Adds a finding when its span is not empty.
fn push(out: &mut Vec<Cand>, start: usize, end: usize, ty: PhiType, conf: f32) {
    if start < end {
        out.push(Cand {
            start,
            end,
            ty,
            conf,
        });
    }
}

impl Rules {
    fn find_numeric(&self, text: &str, out: &mut Vec<Cand>) {
        for m in self.ipv4.find_iter(text) {
            if m.as_str()
                .split('.')
                .all(|o| o.parse::<u32>().is_ok_and(|v| v <= 255))
            {
                push(out, m.start(), m.end(), PhiType::Ip, 0.95);
            }
        }
        for m in self.ssn.find_iter(text) {
            if ssn_valid(m.as_str()) {
                push(out, m.start(), m.end(), PhiType::Ssn, 0.95);
            }
        }
        for m in self.tw_id.find_iter(text) {
            if tw_id_valid(m.as_str()) {
                push(out, m.start(), m.end(), PhiType::NationalId, 0.97);
            }
        }
        for re in [&self.phone_us, &self.phone_tw_mobile, &self.phone_tw_land] {
            for m in re.find_iter(text) {
                let ty = if fax_context(text, m.start()) {
                    PhiType::Fax
                } else {
                    PhiType::Phone
                };
                push(out, m.start(), m.end(), ty, 0.85);
            }
        }
        for c in self.date_num.captures_iter(text) {
            let g = |n: &str| c.name(n).expect("group").as_str();
            if g("s1") != g("s2") {
                continue;
            }
            let roc = c.get(0).expect("match").as_str().starts_with("民國");
            if numeric_date_valid(g("a"), g("b"), g("c"), roc) {
                let m = c.get(0).expect("match");
                push(out, m.start(), m.end(), PhiType::Date, 0.9);
            }
        }
        for c in self.date_md_ctx.captures_iter(text) {
            let d = c.name("d").expect("d");
            let next = text[d.end()..].chars().next();
            let (m, dd) = (
                c["m"].parse::<u32>().unwrap_or(0),
                c["dd"].parse::<u32>().unwrap_or(0),
            );
            if (1..=12).contains(&m)
                && (1..=31).contains(&dd)
                && !matches!(next, Some('/' | '.' | '-'))
            {
                push(out, d.start(), d.end(), PhiType::Date, 0.75);
            }
        }
        for m in self.age_en.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Age, 0.9);
        }
        for c in self.age_label.captures_iter(text) {
            let n = c.name("n").expect("n");
            push(out, n.start(), n.end(), PhiType::Age, 0.85);
        }
        for c in self.zip_state.captures_iter(text) {
            let z = c.name("zip").expect("zip");
            push(out, z.start(), z.end(), PhiType::Zip, 0.85);
        }
        for m in self.card.find_iter(text) {
            let digits: Vec<u8> = m
                .as_str()
                .bytes()
                .filter(u8::is_ascii_digit)
                .map(|b| b - b'0')
                .collect();
            if (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
                push(out, m.start(), m.end(), PhiType::Account, 0.9);
            }
        }
        for m in self.dea.find_iter(text) {
            if dea_valid(m.as_str()) {
                push(out, m.start(), m.end(), PhiType::License, 0.8);
            }
        }
        for m in self.udi.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Device, 0.9);
        }
        for m in self.long_number.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::OtherId, 0.4);
        }
        for m in self.letters_digits.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::OtherId, 0.45);
        }
    }

    fn find_chinese(&self, text: &str, out: &mut Vec<Cand>) {
        for re in [&self.date_zh, &self.date_zh_md] {
            for c in re.captures_iter(text) {
                let m = c.get(0).expect("match");
                let month = c.name("m").map(|x| zh_number(x.as_str())).unwrap_or(0);
                let day = c.name("d").map(|x| zh_number(x.as_str()));
                if (1..=12).contains(&month) && day.is_none_or(|d| (1..=31).contains(&d)) {
                    let s = m.start() + (m.as_str().len() - m.as_str().trim_start().len());
                    push(out, s, m.end(), PhiType::Date, 0.9);
                }
            }
        }
        for c in self.age_zh.captures_iter(text) {
            match c.name("n") {
                Some(n) => push(out, n.start(), n.end(), PhiType::Age, 0.85),
                None => {
                    let m = c.get(0).expect("match");
                    push(out, m.start(), m.end(), PhiType::Age, 0.9);
                }
            }
        }
        for c in self.zip_ctx.captures_iter(text) {
            let z = c.name("zip").expect("zip");
            push(out, z.start(), z.end(), PhiType::Zip, 0.9);
        }
        for c in self.addr_zh.captures_iter(text) {
            let a = c.name("addr").expect("addr");
            let s = trim_left_at(text, a.start(), a.end(), ADDR_STOP);
            if let Some(z) = c.name("zip")
                && s == a.start()
            {
                push(out, z.start(), z.end(), PhiType::Zip, 0.85);
            }
            push(out, s, a.end(), PhiType::Address, 0.85);
        }
        for m in self.city_zh.find_iter(text) {
            push(out, m.start(), m.end(), PhiType::Address, 0.8);
        }
        for c in self.name_zh_label.captures_iter(text) {
            let n = c.name("n").expect("n");
            if let Some(e) = zh_name_end(text, n.start(), n.end()) {
                push(out, n.start(), e, PhiType::Name, 0.85);
            }
        }
        for c in self.name_zh_title.captures_iter(text) {
            let n = c.name("n").expect("n");
            push(out, n.start(), n.end(), PhiType::Name, 0.8);
        }
        for c in self.org_zh.captures_iter(text) {
            let o = c.name("o").expect("o");
            let s = trim_left_at(text, o.start(), o.end(), ORG_STOP);
            let body = &text[s..o.end()];
            // More than the bare suffix, and not a generic reference ("該醫院", "本院").
            let suffix_chars = ORG_SUFFIXES
                .iter()
                .filter(|x| body.ends_with(*x))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0);
            if body.chars().count() >= suffix_chars + 2 {
                push(out, s, o.end(), PhiType::Organization, 0.75);
            }
        }
        for c in self.org_zh_ctx.captures_iter(text) {
            let o = c.name("o").expect("o");
            let e = trim_right_at(text, o.start(), o.end(), ORG_RIGHT_STOP);
            if text[o.start()..e].chars().count() >= 2 {
                push(out, o.start(), e, PhiType::Organization, 0.75);
            }
        }
    }
}

const ORG_SUFFIXES: &[&str] = &[
    "醫學中心",
    "醫療中心",
    "醫院",
    "診所",
    "衛生所",
    "長照中心",
    "護理之家",
    "安養中心",
    "養護中心",
    "藥局",
    "檢驗所",
    "大學",
    "學院",
    "有限公司",
    "公司",
    "銀行",
    "協會",
    "基金會",
];
/// Characters that end the words before an address or an organisation ("住在", "轉至", ...).
const ADDR_STOP: &str = "在於至到的、。，；：";
const ORG_STOP: &str = "在於至到往從由的、是為該本此其各每送赴經向轉入住。，；：就去";
const ORG_RIGHT_STOP: &[&str] = &[
    "擔任", "工作", "上班", "服務", "任職", "的", "，", "、", "。", "；", "當", "負責", "從事",
    "至今", "迄今", "多年", "期間", "退休", "職員", "員工",
];

/// The start of `[start, end)` after the last character of `stops` in it.
fn trim_left_at(text: &str, start: usize, end: usize, stops: &str) -> usize {
    let mut s = start;
    for (i, c) in text[start..end].char_indices() {
        if stops.contains(c) {
            s = start + i + c.len_utf8();
        }
    }
    // Leading context words.
    for w in [
        "地址", "住址", "居住", "患者", "病人", "病患", "目前", "現居", "現住", "戶籍", "住",
    ] {
        if text[s..end].starts_with(w) {
            s += w.len();
        }
    }
    s
}

fn trim_right_at(text: &str, start: usize, end: usize, stops: &[&str]) -> usize {
    let body = &text[start..end];
    let cut = stops
        .iter()
        .filter_map(|w| body.find(w))
        .min()
        .unwrap_or(body.len());
    start + cut
}

/// Where a Chinese name of surname + given characters ends: one given character when the
/// second one starts the following words; `None` when the first does.
fn zh_name_end(text: &str, start: usize, end: usize) -> Option<usize> {
    let body = &text[start..end];
    let surname_len = lexicon::COMPOUND_SURNAMES
        .iter()
        .find(|s| body.starts_with(*s))
        .map(|s| s.len())
        .unwrap_or_else(|| body.chars().next().map_or(0, char::len_utf8));
    let given: Vec<(usize, char)> = body[surname_len..].char_indices().collect();
    match given.as_slice() {
        [] => None,
        [(_, c)] | [(_, c), ..] if lexicon::ZH_NAME_STOP.contains(*c) => None,
        [_, (i, c)] if lexicon::ZH_NAME_STOP.contains(*c) => Some(start + surname_len + i),
        _ => Some(end),
    }
}

/// Countries (not geographic units below a state).
const COUNTRIES: &[&str] = &[
    "Taiwan",
    "China",
    "Japan",
    "Korea",
    "Vietnam",
    "Philippines",
    "Thailand",
    "Indonesia",
    "Malaysia",
    "Singapore",
    "India",
    "Mexico",
    "Canada",
    "America",
    "United States",
    "England",
    "France",
    "Germany",
    "Italy",
    "Spain",
    "Australia",
    "Brazil",
    "Europe",
    "Asia",
    "Africa",
];

/// Words that start sentences rather than organisation names.
const ORG_NOT_FIRST: &[&str] = &[
    "Patient",
    "Pt",
    "He",
    "She",
    "They",
    "Seen",
    "Admitted",
    "Transferred",
    "Discharged",
    "Followed",
    "Presented",
    "Went",
    "At",
    "In",
    "From",
    "To",
    "On",
    "Per",
    "Via",
    "Called",
    "MD",
    "DO",
    "RN",
    "NP",
    "PA",
    "Labs",
    "The",
    "Contacted",
    "Referred",
    "Sent",
    "Returned",
    "Visited",
    "Works",
    "Worked",
    "Employed",
];

/// Drops words in `stop` from the start of a word sequence.
fn strip_leading(text: &str, mut s: usize, e: usize, stop: &[&str]) -> (usize, usize) {
    loop {
        let body = &text[s..e];
        let first_len = body.find([' ', '\t']).unwrap_or(body.len());
        if first_len < body.len() && stop.contains(&&body[..first_len]) {
            s += first_len;
            s += text[s..e].len() - text[s..e].trim_start().len();
            continue;
        }
        return (s, e);
    }
}

/// Drops words in `stop` from both ends of a word sequence.
fn strip_words(
    text: &str,
    start: usize,
    end: usize,
    stop: &HashSet<&'static str>,
) -> (usize, usize) {
    let mut s = start;
    let mut e = end;
    loop {
        let body = &text[s..e];
        let first_len = body.find([' ', '\t']).unwrap_or(body.len());
        let first = body[..first_len].trim_end_matches(['.', ',', ':']);
        if !body.is_empty() && stop.contains(first) {
            s += first_len;
            s += text[s..e].len() - text[s..e].trim_start().len();
            continue;
        }
        let last_start = body.rfind([' ', '\t']).map_or(0, |i| i + 1);
        let last = body[last_start..].trim_end_matches(['.', ',', ':']);
        if !body.is_empty() && stop.contains(last) {
            e = s + body[..last_start].trim_end().len();
            continue;
        }
        break;
    }
    (s, e.max(s))
}

fn is_department(s: &str) -> bool {
    const SPECIALTY: &[&str] = &[
        "Cardiology",
        "Heart",
        "Failure",
        "Oncology",
        "Neurology",
        "Diabetes",
        "Pain",
        "Wound",
        "Anticoagulation",
        "Primary",
        "Care",
        "Family",
        "Internal",
        "Medicine",
        "Pulmonary",
        "Renal",
        "Dialysis",
        "Eye",
        "Dental",
        "Sleep",
        "Memory",
        "Outpatient",
        "Walk-in",
        "Free",
        "Urgent",
        "Clinic",
        "Clinics",
        "Lipid",
        "Hypertension",
        "Transplant",
        "Infusion",
        "Vascular",
        "Surgery",
        "Surgical",
        "General",
        "Pediatric",
        "Pediatrics",
        "Women's",
        "Orthopedic",
        "Orthopedics",
        "Rheumatology",
        "Endocrine",
        "Endocrinology",
        "Travel",
        "Allergy",
        "Asthma",
        "COPD",
        "HIV",
        "Hepatology",
        "Liver",
        "GI",
        "Psychiatry",
        "Behavioral",
        "Health",
        "Mental",
        "Fertility",
        "Hospital",
        "Laboratory",
        "Pharmacy",
        "Lab",
        "Labs",
        "The",
        "Our",
        "Your",
        "Medical",
        "Center",
        "Institute",
        "Emergency",
        "Rehabilitation",
        "Physical",
        "Therapy",
        "Smoking",
        "Cessation",
        "Weight",
        "Management",
    ];
    s.split([' ', '\t']).all(|w| SPECIALTY.contains(&w))
}

fn is_plain_word(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphabetic())
}

fn trim_id(text: &str, start: usize, end: usize, shape: IdShape) -> (usize, usize) {
    let v = &text[start..end];
    let trimmed = match shape {
        IdShape::File => v.trim_end_matches(['.', '-', '/', '_']),
        IdShape::PhoneNumber => v.trim_end_matches(['.', '-', ' ', '(']),
        IdShape::Plate => {
            // "ABC 123" is a plate; "ABC then" is a plate and a word.
            match v.rsplit_once(' ') {
                Some((head, tail)) if tail.chars().all(|c| c.is_ascii_lowercase()) => head,
                _ => v.trim_end_matches(['-', ' ']),
            }
        }
        _ => v.trim_end_matches(['.', '-', '/']),
    };
    (start, start + trimmed.len())
}

/// A fax context word in the 30 bytes before `start`.
fn fax_context(text: &str, start: usize) -> bool {
    let mut from = start.saturating_sub(30);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let before = &text[from..start];
    before.contains("傳真") || before.to_ascii_lowercase().contains("fax")
}

/// US SSN rules: area not 000, 666 or 900-999; group not 00; serial not 0000.
pub fn ssn_valid(s: &str) -> bool {
    let d: Vec<&str> = s.split('-').collect();
    if d.len() != 3 {
        return false;
    }
    let area: u32 = d[0].parse().unwrap_or(0);
    let group: u32 = d[1].parse().unwrap_or(0);
    let serial: u32 = d[2].parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// The value of a Taiwan ID's leading letter (A=10 ... Z=33, in the issuing order).
fn tw_letter_value(c: u8) -> Option<u32> {
    const ORDER: &[u8; 26] = b"ABCDEFGHJKLMNPQRSTUVXYWZIO";
    ORDER.iter().position(|&x| x == c).map(|p| p as u32 + 10)
}

/// The Taiwan national ID / resident certificate checksum (`A123456789`; second character 1,
/// 2, 8 or 9, or A-D on old resident certificates).
pub fn tw_id_valid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || !b[2..].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let Some(first) = tw_letter_value(b[0]) else {
        return false;
    };
    let second = match b[1] {
        b'1' | b'2' | b'8' | b'9' => u32::from(b[1] - b'0'),
        b'A'..=b'D' => tw_letter_value(b[1]).map_or(0, |v| v % 10),
        _ => return false,
    };
    let mut sum = first / 10 + (first % 10) * 9 + second * 8;
    for (i, &c) in b[2..9].iter().enumerate() {
        sum += u32::from(c - b'0') * (7 - i as u32);
    }
    sum += u32::from(b[9] - b'0');
    sum.is_multiple_of(10)
}

/// The Taiwan ID check digit for the first nine characters (surrogates).
pub fn tw_id_check_digit(first9: &[u8]) -> Option<u8> {
    let first = tw_letter_value(first9[0])?;
    let second = u32::from(first9[1].checked_sub(b'0')?);
    let mut sum = first / 10 + (first % 10) * 9 + second * 8;
    for (i, &c) in first9[2..9].iter().enumerate() {
        sum += u32::from(c.checked_sub(b'0')?) * (7 - i as u32);
    }
    Some(((10 - sum % 10) % 10) as u8)
}

/// The Luhn checksum (card numbers, NPI).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The DEA registration number checksum.
pub fn dea_valid(s: &str) -> bool {
    let d: Vec<u32> = s.bytes().skip(2).map(|b| u32::from(b - b'0')).collect();
    d.len() == 7 && ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10 == d[6]
}

/// Whether `a sep b sep c` is a date: ISO `y-m-d`, `m/d/y` or `d/m/y` (2- or 4-digit year), or
/// ROC `yyy/mm/dd` (year 1-150 in two or three digits).
fn numeric_date_valid(a: &str, b: &str, c: &str, roc: bool) -> bool {
    let (na, nb, nc) = (
        a.parse::<u32>().unwrap_or(0),
        b.parse::<u32>().unwrap_or(0),
        c.parse::<u32>().unwrap_or(0),
    );
    let month = |m: u32| (1..=12).contains(&m);
    let day = |d: u32| (1..=31).contains(&d);
    if roc {
        return (1..=150).contains(&na) && month(nb) && day(nc) && c.len() <= 2;
    }
    if a.len() == 4 {
        return (1800..=2100).contains(&na) && month(nb) && day(nc) && c.len() <= 2;
    }
    if a.len() == 3 {
        return (1..=150).contains(&na) && month(nb) && day(nc) && c.len() <= 2;
    }
    if a.len() > 2 {
        return false;
    }
    // Two-digit ROC years (`85/03/12`) and `m/d/yy`, `d/m/yy`.
    if c.len() <= 2 && na >= 1 && ((month(nb) && day(nc)) || (month(na) && day(nb))) {
        return true;
    }
    let year_ok = c.len() == 4 && (1800..=2100).contains(&nc);
    year_ok && ((month(na) && day(nb)) || (month(nb) && day(na)))
}

/// A number written in digits or Chinese numerals (一 .. 九十九, 〇 digit strings).
pub fn zh_number(s: &str) -> u32 {
    if let Ok(v) = s.parse::<u32>() {
        return v;
    }
    let digit = |c: char| -> Option<u32> {
        Some(match c {
            '〇' | '○' | '零' => 0,
            '一' => 1,
            '二' => 2,
            '三' => 3,
            '四' => 4,
            '五' => 5,
            '六' => 6,
            '七' => 7,
            '八' => 8,
            '九' => 9,
            _ => return None,
        })
    };
    let chars: Vec<char> = s.chars().collect();
    if chars.contains(&'十') {
        let pos = chars.iter().position(|&c| c == '十').unwrap_or(0);
        let tens = if pos == 0 {
            1
        } else {
            digit(chars[0]).unwrap_or(0)
        };
        let ones = chars.get(pos + 1).and_then(|&c| digit(c)).unwrap_or(0);
        return tens * 10 + ones;
    }
    chars
        .iter()
        .try_fold(0u32, |acc, &c| digit(c).map(|d| acc * 10 + d))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(String, PhiType)> {
        let mut v: Vec<(String, PhiType)> = RULES
            .find(text)
            .into_iter()
            .map(|c| (text[c.start..c.end].to_owned(), c.ty))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup();
        v
    }

    fn has(text: &str, want: &str, ty: PhiType) {
        let f = found(text);
        assert!(
            f.iter().any(|(s, t)| s == want && *t == ty),
            "{want:?} as {ty} in {text:?}: {f:?}"
        );
    }

    #[test]
    fn checksums() {
        assert!(tw_id_valid("A123456789"));
        assert!(!tw_id_valid("A123456788"));
        assert_eq!(tw_id_check_digit(b"A12345678"), Some(9));
        assert!(luhn_valid(&[
            4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1
        ]));
        assert!(!luhn_valid(&[
            4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2
        ]));
        assert!(ssn_valid("123-45-6789"));
        assert!(!ssn_valid("666-45-6789"));
        assert!(!ssn_valid("912-45-6789"));
        assert!(!ssn_valid("123-00-6789"));
        assert!(dea_valid("AB1234563"));
        assert!(!dea_valid("AB1234564"));
        assert_eq!(zh_number("十二"), 12);
        assert_eq!(zh_number("二十五"), 25);
        assert_eq!(zh_number("一一二"), 112);
    }

    #[test]
    fn english_identifiers() {
        has("MRN: 00482913", "00482913", PhiType::Mrn);
        has("Medical record number 7781-2231", "7781-2231", PhiType::Mrn);
        has("SSN 123-45-6789.", "123-45-6789", PhiType::Ssn);
        has(
            "call (415) 555-0172 x12 today",
            "(415) 555-0172 x12",
            PhiType::Phone,
        );
        has("Fax: 415-555-0199", "415-555-0199", PhiType::Fax);
        has(
            "mail jdoe@example.org now",
            "jdoe@example.org",
            PhiType::Email,
        );
        has(
            "see https://portal.example.com/p/123.",
            "https://portal.example.com/p/123",
            PhiType::Url,
        );
        has("from 192.168.10.4 at", "192.168.10.4", PhiType::Ip);
        has("seen on 03/05/2023 and", "03/05/2023", PhiType::Date);
        has("admitted March 5, 2023.", "March 5, 2023", PhiType::Date);
        has("on 5th of March 2023", "5th of March 2023", PhiType::Date);
        has("DOB 1950-11-02", "1950-11-02", PhiType::Date);
        has("a 92-year-old man", "92-year-old", PhiType::Age);
        has("Mr. John Smith was", "John Smith", PhiType::Name);
        has(
            "lives at 1234 Elm Street Apt. 5, Springfield, IL 62704",
            "1234 Elm Street Apt. 5",
            PhiType::Address,
        );
        has(
            "lives at 1234 Elm Street, Springfield, IL 62704",
            "62704",
            PhiType::Zip,
        );
        has(
            "transferred to St. Mary's Hospital today",
            "St. Mary's Hospital",
            PhiType::Organization,
        );
        has(
            "card 4111 1111 1111 1111",
            "4111 1111 1111 1111",
            PhiType::Account,
        );
    }

    #[test]
    fn chinese_identifiers() {
        has("身分證字號：A123456789", "A123456789", PhiType::NationalId);
        has("病歷號：12345678", "12345678", PhiType::Mrn);
        has("手機0912-345-678", "0912-345-678", PhiType::Phone);
        has("於民國112年3月5日入院", "民國112年3月5日", PhiType::Date);
        has("112/03/05 回診", "112/03/05", PhiType::Date);
        has("患者王小明先生", "王小明", PhiType::Name);
        has("主治醫師：陳大文", "陳大文", PhiType::Name);
        has(
            "住在台北市中山區林森北路99號5樓",
            "台北市中山區林森北路99號5樓",
            PhiType::Address,
        );
        has(
            "轉至臺北榮民總醫院治療",
            "臺北榮民總醫院",
            PhiType::Organization,
        );
        has(
            "健保卡號：0000 1234 5678",
            "0000 1234 5678",
            PhiType::NhiCard,
        );
        has("享年95歲", "95歲", PhiType::Age);
        has("年齡：92", "92", PhiType::Age);
        has("95歲女性", "95歲", PhiType::Age);
    }

    #[test]
    fn non_phi_stays() {
        for text in [
            "BP 132/84, HR 88, EF 30%, Na 134, glucose 7.2 mmol/L.",
            "A 67-year-old woman with NYHA class III heart failure since 2019.",
            "Metformin 500 mg twice daily; follow up in 3 months.",
            "血壓 132/84 mmHg，心跳每分鐘 88 下，2019年診斷心衰竭。",
        ] {
            let f = found(text);
            assert!(f.is_empty(), "{text:?}: {f:?}");
        }
    }
}
