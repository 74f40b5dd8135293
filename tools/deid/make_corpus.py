#!/usr/bin/env python3
"""Writes the labelled de-identification corpus: fixtures/deid/dev.jsonl and test.jsonl.

Synthetic clinical notes in English and Traditional Chinese whose protected health information
comes from PyPI `faker` (locales en_US and zh_TW) and a fixed seed, each identifier labelled with
its type and code-point offsets (end exclusive). One JSON object per line:
    {"id", "split", "lang", "text", "spans": [{"start", "end", "type", "text"}]}

The test split is held out: the recognizers are never tuned on it. It is generated from other
random draws and also uses phrasings that the dev split never shows (`H(...)` below), so it
measures how the rules carry to wording they were not written against.

Run by hand (CI only reads the committed files):
    python3 -m venv /tmp/corpus-venv && /tmp/corpus-venv/bin/pip install faker==40.54.0
    /tmp/corpus-venv/bin/python tools/deid/make_corpus.py
"""

import datetime
import json
import os
import random
import re
import sys

import faker

FAKER_VERSION = "40.54.0"
SEED = 20261214
NOTES = {"dev": {"en": 60, "zh-TW": 60}, "test": {"en": 60, "zh-TW": 60}}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures", "deid")

if faker.VERSION != FAKER_VERSION:
    sys.exit(f"faker {FAKER_VERSION} is pinned (found {faker.VERSION}): pip install faker=={FAKER_VERSION}")


class H(str):
    """A phrasing only the held-out test split uses."""


def pick(rng, options, split):
    pool = [o for o in options if split == "test" or not isinstance(o, H)]
    return rng.choice(pool)


# ---------------------------------------------------------------- identifiers


def tw_id(rng):
    letters = "ABCDEFGHJKLMNPQRSTUVXYWZIO"
    first = rng.choice("ABCDEFGHJKLMNPQRSTUVXYWZ")
    v = letters.index(first) + 10
    body = [rng.choice("12")] + [str(rng.randrange(10)) for _ in range(7)]
    s = v // 10 + (v % 10) * 9 + int(body[0]) * 8 + sum(int(d) * (7 - i) for i, d in enumerate(body[1:]))
    return first + "".join(body) + str((10 - s % 10) % 10)


def luhn_complete(digits):
    for d in range(10):
        ds = digits + [d]
        total = 0
        for i, x in enumerate(reversed(ds)):
            if i % 2 == 1:
                x *= 2
                if x > 9:
                    x -= 9
            total += x
        if total % 10 == 0:
            return ds
    raise AssertionError


def dea(rng):
    letters = rng.choice("ABFGM") + rng.choice("ABCDEFGHJKLMNPRSTUWXYZ")
    d = [rng.randrange(10) for _ in range(6)]
    check = ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10
    return letters + "".join(map(str, d)) + str(check)


def digits(rng, n):
    return "".join(str(rng.randrange(10)) for _ in range(n))


def upper(rng, n):
    return "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(n))


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def en_date(rng, d, split):
    m, y = d.month, d.year
    forms = [
        f"{m:02d}/{d.day:02d}/{y}",
        f"{m}/{d.day}/{y}",
        f"{y}-{m:02d}-{d.day:02d}",
        f"{MONTHS[m-1]} {d.day}, {y}",
        f"{MONTHS[m-1][:3]} {d.day}, {y}",
        f"{d.day} {MONTHS[m-1]} {y}",
        f"{m:02d}/{d.day:02d}/{y % 100:02d}",
        H(f"{d.day:02d}-{MONTHS[m-1][:3].upper()}-{y}"),
        H(f"{MONTHS[m-1]} {d.day}"),
        H(f"{MONTHS[m-1]} {y}"),
        H(f"{MONTHS[m-1]} {d.day}{'th' if 11 <= d.day <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d.day % 10, 'th')}, {y}"),
    ]
    return pick(rng, forms, split)


def zh_date(rng, d, split):
    r = d.year - 1911
    forms = [
        f"民國{r}年{d.month}月{d.day}日",
        f"{r}年{d.month}月{d.day}日",
        f"{r}/{d.month:02d}/{d.day:02d}",
        f"{d.year}年{d.month}月{d.day}日",
        f"{d.year}/{d.month:02d}/{d.day:02d}",
        f"{d.year}-{d.month:02d}-{d.day:02d}",
        H(f"{d.month}月{d.day}日"),
        H(f"民國{r}年{d.month}月"),
        H(f"{r}.{d.month:02d}.{d.day:02d}"),
    ]
    return pick(rng, forms, split)


def rand_date(rng, start_year, end_year):
    start = datetime.date(start_year, 1, 1).toordinal()
    end = datetime.date(end_year, 12, 31).toordinal()
    return datetime.date.fromordinal(rng.randrange(start, end))


TW_CITIES = ["臺北市", "新北市", "桃園市", "臺中市", "臺南市", "高雄市", "基隆市", "新竹市",
             "新竹縣", "彰化縣", "屏東縣", "宜蘭縣", "花蓮縣", "台北市", "台中市"]
TW_DISTRICTS = ["中正區", "大安區", "信義區", "板橋區", "中壢區", "西屯區", "東區", "苓雅區",
                "三民區", "北區", "竹北市", "員林市", "屏東市", "羅東鎮", "吉安鄉"]
HOSP_EN = ["Memorial Hospital", "Medical Center", "Community Hospital", "Regional Medical Center",
           "General Hospital", "Family Clinic", "Health System", "Heart Institute"]
HOSP_ZH = ["榮民總醫院", "綜合醫院", "紀念醫院", "基督教醫院", "聯合醫院", "醫院", "診所", "醫學中心"]


NUMBERED = {"date", "zdate", "phone", "zphone", "dr", "hosp"}


class Persona:
    """The identifiers of one note (a patient, relatives, clinicians, places)."""

    def __init__(self, rng, en, zh, split, lang):
        self.rng, self.en, self.zh, self.split, self.lang = rng, en, zh, split, lang
        self.cache = {}

    def get(self, key):
        if key not in self.cache:
            self.cache[key] = self.make(key)
        return self.cache[key]

    def make(self, key):
        rng, en, zh, split = self.rng, self.en, self.zh, self.split
        # `date2`, `phone3`: other identifiers of the same kind.
        base = key[:-1] if key[-1].isdigit() and key[:-1] in NUMBERED else key
        if base == "pt":
            return f"{en.first_name()} {en.last_name()}"
        if base == "pt_last":
            return self.get("pt").split(" ")[-1]
        if base == "pt_first":
            return self.get("pt").split(" ")[0]
        if base in ("dr", "rel"):
            return f"{en.first_name()} {en.last_name()}"
        if base in ("dr_last", "rel_last"):
            return self.get(base[:-5]).split(" ")[-1]
        if base in ("zpt", "zdr", "zrel"):
            return zh.name()
        if base in ("zpt_sur", "zdr_sur"):
            return self.get(base[:-4])[0]
        if base == "date":
            return en_date(rng, rand_date(rng, 2015, 2025), split)
        if base == "dob":
            return en_date(rng, rand_date(rng, 1920, 2005), split)
        if base == "zdate":
            return zh_date(rng, rand_date(rng, 2015, 2025), split)
        if base == "zdob":
            return zh_date(rng, rand_date(rng, 1920, 2005), split)
        if base == "age90":
            n = rng.randrange(90, 106)
            return pick(rng, [f"{n}-year-old", f"{n} years old", f"{n} y/o", H(f"{n} yo"), H(f"{n}-yr-old")], split)
        if base == "age90n":
            return str(rng.randrange(90, 106))
        if base == "zage90":
            return f"{rng.randrange(90, 106)}歲"
        if base == "phone":
            return pick(rng, [en.phone_number(), f"({digits(rng,3)}) {digits(rng,3)}-{digits(rng,4)}",
                              f"{digits(rng,3)}-{digits(rng,3)}-{digits(rng,4)}", H(f"+1 {digits(rng,3)} {digits(rng,3)} {digits(rng,4)}")], split)
        if base == "zphone":
            return pick(rng, [f"09{digits(rng,2)}-{digits(rng,3)}-{digits(rng,3)}", f"09{digits(rng,8)}",
                              f"(0{rng.choice('2345678')}){digits(rng,4)}-{digits(rng,4)}", f"0{rng.choice('2345678')}-{digits(rng,4)}-{digits(rng,4)}",
                              H(f"+886 9{digits(rng,2)} {digits(rng,3)} {digits(rng,3)}"), H(f"09{digits(rng,2)} {digits(rng,3)} {digits(rng,3)}")], split)
        if base == "email":
            return en.email()
        if base == "url":
            return pick(rng, [en.url(), en.url() + f"patients/{digits(rng,6)}", H("www." + en.domain_name())], split)
        if base == "ip":
            return en.ipv4() if rng.random() < 0.8 else en.ipv6()
        if base == "ssn":
            return en.ssn()
        if base == "mrn":
            return pick(rng, [digits(rng, 8), f"{upper(rng,1)}{digits(rng,7)}", f"{digits(rng,2)}-{digits(rng,3)}-{digits(rng,2)}", H(f"MR{digits(rng,6)}")], split)
        if base == "member":
            return pick(rng, [f"{upper(rng,3)}{digits(rng,9)}", f"{digits(rng,1)}{upper(rng,2)}{digits(rng,1)}-{upper(rng,2)}{digits(rng,1)}-{upper(rng,2)}{digits(rng,2)}"], split)
        if base == "acct":
            return pick(rng, [digits(rng, 10), f"{digits(rng,4)}-{digits(rng,6)}"], split)
        if base == "card":
            ds = luhn_complete([rng.choice([4, 5])] + [rng.randrange(10) for _ in range(14)])
            s = "".join(map(str, ds))
            return pick(rng, [s, " ".join(s[i:i + 4] for i in range(0, 16, 4))], split)
        if base == "dea":
            return dea(rng)
        if base == "lic":
            return pick(rng, [f"{upper(rng,1)}{digits(rng,6)}", f"MD{digits(rng,6)}", H(f"{digits(rng,2)}-{digits(rng,5)}")], split)
        if base == "vin":
            return en.vin()
        if base == "plate":
            p = en.license_plate()
            return p if any(c.isdigit() for c in p) and len(p) >= 4 else f"{upper(rng,3)}-{digits(rng,4)}"
        if base == "zplate":
            return f"{upper(rng,3)}-{digits(rng,4)}"
        if base == "serial":
            return pick(rng, [f"{upper(rng,3)}{digits(rng,6)}{upper(rng,1)}", f"SN-{digits(rng,8)}", H(f"{digits(rng,4)}-{upper(rng,2)}{digits(rng,4)}")], split)
        if base == "udi":
            return f"(01){digits(rng,14)}(17){digits(rng,6)}(10){upper(rng,2)}{digits(rng,4)}"
        if base == "bio":
            return pick(rng, [f"FP-{digits(rng,5)}-{upper(rng,1)}", f"VP{digits(rng,6)}", f"BIO{digits(rng,7)}"], split)
        if base == "photo":
            return pick(rng, [f"IMG_{digits(rng,4)}.jpg", f"P-{rng.randrange(2015,2026)}-{digits(rng,4)}", f"face_{digits(rng,6)}.png"], split)
        if base == "accession":
            return pick(rng, [f"S{digits(rng,2)}-{digits(rng,5)}", f"{rng.randrange(2015,2026)}-{digits(rng,6)}", H(f"CY{digits(rng,7)}")], split)
        if base == "passport":
            return digits(rng, 9)
        if base == "twid":
            return tw_id(rng)
        if base == "nhi":
            s = "0000" + digits(rng, 8)
            return pick(rng, [s, f"{s[:4]} {s[4:8]} {s[8:]}"], split)
        if base == "hosp":
            return pick(rng, [f"{en.last_name()} {rng.choice(HOSP_EN)}", f"St. {en.first_name()}'s Hospital",
                              f"{en.city()} {rng.choice(HOSP_EN)}", H(f"{en.last_name()} Medical Group")], split)
        if base == "company":
            return pick(rng, [en.company(), f"{en.last_name()} {rng.choice(['Inc.', 'LLC', 'Group', 'Ltd'])}"], split)
        if base == "street":
            return en.street_address()
        if base == "city":
            return en.city()
        if base == "state":
            return en.state_abbr(include_territories=False)
        if base == "zip":
            return en.postcode()
        if base == "zhosp":
            return pick(rng, [f"{rng.choice(TW_CITIES)[:2]}{rng.choice(HOSP_ZH)}", f"{zh.last_name()}{zh.first_name()}診所",
                              H(f"{rng.choice(['仁愛', '博愛', '安泰', '光田', '新光'])}{rng.choice(HOSP_ZH)}")], split)
        if base == "zcompany":
            return zh.company()
        if base == "zaddr":
            if rng.random() < 0.5:
                return f"{rng.choice(TW_CITIES)}{rng.choice(TW_DISTRICTS)}{zh.street_address()}"
            return zh.address().split(" ", 1)[1]
        if base == "zzip":
            return pick(rng, [digits(rng, 3), digits(rng, 5)], split)
        if base == "zcity":
            return f"{rng.choice(TW_CITIES)}{rng.choice(TW_DISTRICTS)}"
        if base == "zmrn":
            return pick(rng, [digits(rng, 8), f"{upper(rng,1)}{digits(rng,7)}"], split)
        raise KeyError(key)


# ---------------------------------------------------------------- templates
# `{TYPE:key}` is a labelled identifier, `{_:key}` unlabelled filler.

FILL_EN = {
    "sex": ["woman", "man", "female", "male"],
    "pmh": ["HFrEF (EF 30%), hypertension and type 2 diabetes", "atrial fibrillation on apixaban",
            "COPD (GOLD 3) and chronic kidney disease stage 3b", "coronary artery disease s/p PCI in 2018",
            "hypertension, hyperlipidemia and prior stroke"],
    "cc": ["three days of worsening dyspnea and orthopnea", "substernal chest pain radiating to the left arm",
           "fever, productive cough and pleuritic chest pain", "a fall at home with left hip pain",
           "lower extremity edema and a 4 kg weight gain"],
    "relation": ["daughter", "son", "wife", "husband", "niece", "neighbor"],
    "job": ["bus driver", "accountant", "teacher", "warehouse supervisor", "retired engineer"],
    "young": [str(x) for x in range(22, 89)],
    "year": [str(x) for x in range(1995, 2024)],
    "ef": ["25", "30", "35", "40", "55"],
    "car": ["sedan", "pickup truck", "SUV"],
}

EN_HEADER = [
    ["Patient: {NAME:pt}", "Name: {NAME:pt}", "Patient name: {NAME:pt}", H("Pt name - {NAME:pt}")],
    ["MRN: {MRN:mrn}", "Medical record number: {MRN:mrn}", "MR# {MRN:mrn}", H("Chart #{MRN:mrn}")],
    ["DOB: {DATE:dob}", "Date of birth: {DATE:dob}", H("Born {DATE:dob}")],
    ["Admission date: {DATE:date1}", "Admitted: {DATE:date1}", "Date of service: {DATE:date1}"],
    ["SSN: {SSN:ssn}", "Social Security No. {SSN:ssn}"],
    ["Insurance: Medicare ID {HEALTH_PLAN:member}", "Member ID: {HEALTH_PLAN:member}", H("Plan subscriber {HEALTH_PLAN:member}")],
    ["Account number: {ACCOUNT:acct}", "Acct #: {ACCOUNT:acct}", H("Billing acct {ACCOUNT:acct}")],
    ["Address: {ADDRESS:street}, {ADDRESS:city}, {_:state} {ZIP:zip}", H("Home: {ADDRESS:street}, {ADDRESS:city} {_:state} {ZIP:zip}")],
    ["Phone: {PHONE:phone}", "Cell: {PHONE:phone}", "Tel: {PHONE:phone}", H("Best number to reach: {PHONE:phone}")],
    ["Fax: {FAX:phone2}", H("Results faxed to {FAX:phone2}")],
    ["Email: {EMAIL:email}", "E-mail: {EMAIL:email}"],
    ["Emergency contact: {NAME:rel} ({_:relation}), {PHONE:phone3}", H("Next of kin {NAME:rel}, {_:relation}")],
    ["PCP: Dr. {NAME:dr2}", "Primary care physician: {NAME:dr2}", H("Referring: Dr. {NAME:dr2}")],
    ["Attending: {NAME:dr}, MD", "Attending physician: {NAME:dr}"],
]

EN_BODY = [
    ["{NAME:pt} is a {AGE:age90} {_:sex} with a history of {_:pmh} who presents with {_:cc}.",
     "{NAME:pt} is a {_:young}-year-old {_:sex} with a history of {_:pmh} who presents with {_:cc}.",
     "Mr. {NAME:pt_last} is a {_:young}-year-old with {_:pmh}, admitted with {_:cc}.",
     H("This {AGE:age90} {_:sex} ({NAME:pt}) has {_:pmh} and came in with {_:cc}.")],
    ["Ms. {NAME:pt_last} was admitted to {ORGANIZATION:hosp} on {DATE:date1} for {_:cc}.",
     "The patient was seen at {ORGANIZATION:hosp} on {DATE:date1}.",
     H("Transferred in from {ORGANIZATION:hosp}, arriving {DATE:date1}.")],
    ["Echocardiogram on {DATE:date2} showed an ejection fraction of {_:ef}%.",
     "CT chest dated {DATE:date2} was negative for pulmonary embolism.",
     H("{DATE:date2}: echo with EF {_:ef}%.")],
    ["She lives at {ADDRESS:street} in {ADDRESS:city}, {_:state} with her {_:relation}, {NAME:rel}.",
     "He lives in {ADDRESS:city} with his {_:relation}.",
     H("Discharge to home at {ADDRESS:street}, {ADDRESS:city}.")],
    ["He works as a {_:job} at {ORGANIZATION:company}.", "She is employed by {ORGANIZATION:company}.",
     H("Occupation: {_:job} ({ORGANIZATION:company}).")],
    ["Pacemaker serial number {DEVICE:serial} was interrogated without events.",
     "Device ID: {DEVICE:serial}. UDI {DEVICE:udi} recorded in the implant log.",
     H("ICD (model/serial {DEVICE:serial}) interrogated.")],
    ["Follow-up with Dr. {NAME:dr_last} at {ORGANIZATION:hosp2} on {DATE:date3}.",
     "Return visit scheduled for {DATE:date3} with Dr. {NAME:dr_last}.",
     H("Next visit {DATE:date3} at {ORGANIZATION:hosp2}.")],
    ["Results were sent to {EMAIL:email} and posted at {URL:url}.",
     "Patient portal: {URL:url}", H("Contact {EMAIL:email} or {PHONE:phone} with questions.")],
    ["Remote monitoring session from IP address {IP:ip}.", "Telehealth visit connected from {IP:ip}."],
    ["He drove himself in a {_:car}, license plate {VEHICLE:plate}.", "Vehicle VIN {VEHICLE:vin} noted in the police report.",
     H("Car ({_:car}) plate number {VEHICLE:plate} left in the ED lot.")],
    ["Fingerprint ID {BIOMETRIC:bio} was used for the medication cabinet.", "Voiceprint ID {BIOMETRIC:bio} enrolled for phone refills.",
     H("Biometric identifier: {BIOMETRIC:bio}.")],
    ["A full-face photograph ({PHOTO:photo}) is stored in the chart.", "Photo file {PHOTO:photo} attached for identification.",
     H("Headshot {PHOTO:photo} uploaded.")],
    ["Pathology accession number {OTHER_ID:accession}.", "Passport number {OTHER_ID:passport} copied for travel insurance.",
     H("Specimen ID {OTHER_ID:accession} sent to pathology.")],
    ["Prescriber DEA {LICENSE:dea}; state license {LICENSE:lic}.", "Ordering provider license number {LICENSE:lic}.",
     H("DEA# {LICENSE:dea}.")],
    ["The copay was paid with card {ACCOUNT:card}.", H("Card on file: {ACCOUNT:card}.")],
    ["Her {_:relation}, {NAME:rel}, can be reached at {PHONE:phone3}.", "Spoke with {_:relation} {NAME:rel} by phone at {PHONE:phone3}.",
     H("{NAME:rel} (her {_:relation}) brought her in.")],
    ["Born in Taiwan; Taiwan ID {NATIONAL_ID:twid}, NHI card number {NHI_CARD:nhi}.", H("National ID {NATIONAL_ID:twid} on the visa form.")],
    ["At {AGE:age90}, she remains independent in ADLs.", "The patient, age {AGE:age90n}, declined intubation.",
     H("Aged {AGE:age90n}, he lives alone.")],
    ["Signed: {NAME:dr}, MD", "Electronically signed by {NAME:dr}, MD on {DATE:date4}.", H("Dictated by {NAME:dr}.")],
]

EN_PLAIN = [
    "BP 132/84 mmHg, HR 88, RR 18, SpO2 96% on room air, temperature 37.8 C.",
    "Labs: Na 134, K 4.1, Cr 1.3 mg/dL, BNP 1,240 pg/mL, troponin 0.04 ng/mL, HbA1c 7.2%.",
    "Diagnosed with type 2 diabetes in {_:year}.",
    "Metformin 500 mg twice daily; furosemide 40 mg IV twice daily; apixaban 5 mg BID.",
    "Plan: continue GDMT, daily weights, fluid restriction 1.5 L/day, follow up in 2 weeks.",
    "Chest X-ray: bilateral pleural effusions, cardiomegaly. ECG: sinus rhythm 88 bpm, QTc 460 ms.",
    "NYHA class III. Alert and oriented x3. No focal neurological deficits.",
]

FILL_ZH = {
    "title": ["先生", "女士"],
    "pmh": ["心衰竭與高血壓", "第二型糖尿病", "慢性阻塞性肺病", "心房顫動", "慢性腎臟病第三期"],
    "cc": ["喘與下肢水腫三天", "胸悶", "發燒咳嗽", "在家中跌倒", "食慾不振"],
    "relation": ["女兒", "兒子", "太太", "先生", "媳婦"],
    "job": ["會計", "司機", "教師", "工程師", "業務"],
    "dept": ["心臟內科", "胸腔內科", "腎臟科", "新陳代謝科"],
    "young": [str(x) for x in range(22, 89)],
    "year": [str(x) for x in range(1995, 2024)],
    "ef": ["25", "30", "35", "40", "55"],
}

ZH_HEADER = [
    ["姓名：{NAME:zpt}", "病患姓名：{NAME:zpt}", H("病人 {NAME:zpt}")],
    ["病歷號：{MRN:zmrn}", "病歷號碼：{MRN:zmrn}", H("病歷編號 {MRN:zmrn}")],
    ["身分證字號：{NATIONAL_ID:twid}", H("身份證號碼 {NATIONAL_ID:twid}")],
    ["健保卡號：{NHI_CARD:nhi}"],
    ["出生日期：{DATE:zdob}", "生日：{DATE:zdob}", H("出生：{DATE:zdob}")],
    ["入院日期：{DATE:zdate1}", "就診日期：{DATE:zdate1}"],
    ["地址：{ZIP:zzip} {ADDRESS:zaddr}", "住址：{ADDRESS:zaddr}", H("通訊處：{ADDRESS:zaddr}")],
    ["聯絡電話：{PHONE:zphone}", "手機：{PHONE:zphone}", H("聯絡方式 {PHONE:zphone}")],
    ["傳真：{FAX:zphone2}"],
    ["電子郵件：{EMAIL:email}", "Email：{EMAIL:email}"],
    ["緊急聯絡人：{NAME:zrel}（{_:relation}）{PHONE:zphone3}", H("家屬聯絡：{NAME:zrel}，{PHONE:zphone3}")],
    ["主治醫師：{NAME:zdr}", "醫師：{NAME:zdr}"],
]

ZH_BODY = [
    ["{NAME:zpt}{_:title}，{AGE:zage90}，有{_:pmh}病史，因{_:cc}於{DATE:zdate1}至本院急診就醫。",
     "{NAME:zpt}{_:title}，{_:young}歲，有{_:pmh}病史，因{_:cc}入院。",
     "患者{NAME:zpt}，{AGE:zage90}，主訴{_:cc}。",
     H("個案為{AGE:zage90}長者，{_:pmh}，此次因{_:cc}來院。")],
    ["患者於{DATE:zdate2}曾在{ORGANIZATION:zhosp}住院治療。", "病人曾於{ORGANIZATION:zhosp}接受心導管檢查。",
     H("{DATE:zdate2}自{ORGANIZATION:zhosp}轉入。")],
    ["{DATE:zdate3}心臟超音波顯示左心室射出分率{_:ef}%。", "於{DATE:zdate3}接受胸部電腦斷層檢查，未見肺栓塞。"],
    ["個案居住於{ADDRESS:zcity}，與{_:relation}同住。", "現住{ADDRESS:zaddr}，獨居。",
     H("寄送報告至{ADDRESS:zaddr}。")],
    ["任職於{ORGANIZATION:zcompany}擔任{_:job}。", H("服務單位：{ORGANIZATION:zcompany}。")],
    ["心律調節器序號：{DEVICE:serial}。", H("植入式去顫器裝置編號 {DEVICE:serial}。")],
    ["檢體編號：{OTHER_ID:accession}。", "護照號碼：{OTHER_ID:passport}。"],
    ["保單號碼：{HEALTH_PLAN:member}。", H("商業保險 {HEALTH_PLAN:member}。")],
    ["開立醫師證書字號：{LICENSE:lic}。"],
    ["車牌號碼：{VEHICLE:zplate}。", H("車號 {VEHICLE:zplate} 停放於急診。")],
    ["指紋編號：{BIOMETRIC:bio}。", H("聲紋編號 {BIOMETRIC:bio}。")],
    ["照片檔名：{PHOTO:photo}。", H("大頭照 {PHOTO:photo}。")],
    ["自費帳號：{ACCOUNT:acct}。"],
    ["線上諮詢網址：{URL:url}", "遠距照護登入IP：{IP:ip}。"],
    ["預計{DATE:zdate4}回診{_:dept}，由{NAME:zdr_sur}醫師追蹤。", H("{DATE:zdate4}上午門診追蹤。")],
    ["家屬{NAME:zrel}表示病人近日食慾不佳。", H("社工師已聯絡{NAME:zrel}（電話{PHONE:zphone3}）。")],
    ["{NAME:zpt_sur}{_:title}今日意識清楚，可下床活動。", H("{NAME:zpt}今日意識清楚。")],
    ["享年{AGE:zage90}。", "年齡：{AGE:zage90}"],
]

ZH_PLAIN = [
    "血壓 132/84 mmHg，心跳每分鐘 88 下，血氧 96%。",
    "檢驗：鈉 134、鉀 4.1、肌酸酐 1.3 mg/dL、BNP 1240 pg/mL。",
    "{_:year}年診斷第二型糖尿病。",
    "出院後持續服用 furosemide 40 mg 每日一次、apixaban 5 mg 每日兩次。",
    "建議低鹽飲食、每日量體重，兩週後門診追蹤。",
    "胸部X光：兩側肋膜積液、心臟擴大。心電圖：竇性心律 88 bpm。",
]

PLACEHOLDER = re.compile(r"\{([A-Z_]+):([a-z0-9_]+)\}")


def render(template, persona, fill, rng, parts):
    pos = 0
    for m in PLACEHOLDER.finditer(template):
        parts.append((template[pos:m.start()], None))
        ty, key = m.group(1), m.group(2)
        if ty == "_":
            value = persona.get(key) if key in ("state",) else rng.choice(fill[key])
            parts.append((value, None))
        else:
            parts.append((persona.get(key), ty))
        pos = m.end()
    parts.append((template[pos:], None))


def make_note(rng, en, zh, split, lang, idx):
    persona = Persona(rng, en, zh, split, lang)
    if lang == "en":
        header, body, plain, fill = EN_HEADER, EN_BODY, EN_PLAIN, FILL_EN
        titles = ["DISCHARGE SUMMARY", "PROGRESS NOTE", "ADMISSION H&P", "CARDIOLOGY CONSULT"]
    else:
        header, body, plain, fill = ZH_HEADER, ZH_BODY, ZH_PLAIN, FILL_ZH
        titles = ["出院摘要", "病程紀錄", "入院紀錄", "心臟科會診單"]
    parts = [(rng.choice(titles) + "\n", None)]
    for gi in sorted(rng.sample(range(len(header)), rng.randrange(6, len(header) + 1))):
        render(pick(rng, header[gi], split), persona, fill, rng, parts)
        parts.append(("\n", None))
    parts.append(("\n", None))
    sentences = [pick(rng, g, split) for g in rng.sample(body, rng.randrange(7, 12))]
    sentences += rng.sample(plain, rng.randrange(2, 5))
    rng.shuffle(sentences)
    for i, s in enumerate(sentences):
        render(s, persona, fill, rng, parts)
        parts.append(("\n" if i % 3 == 2 else (" " if lang == "en" else ""), None))
    text, spans = "", []
    for value, ty in parts:
        if ty is not None:
            spans.append({"start": len(text), "end": len(text) + len(value), "type": ty, "text": value})
        text += value
    for s in spans:
        assert text[s["start"]:s["end"]] == s["text"]
    return {"id": f"{lang}-{split}-{idx:04d}", "split": split, "lang": lang, "text": text, "spans": spans}


def main():
    os.makedirs(OUT, exist_ok=True)
    totals = {}
    for si, (split, langs) in enumerate(NOTES.items()):
        rng = random.Random(SEED + si)
        en = faker.Faker("en_US")
        zh = faker.Faker("zh_TW")
        en.seed_instance(SEED + 10 + si)
        zh.seed_instance(SEED + 20 + si)
        notes = []
        for lang, n in langs.items():
            for i in range(n):
                notes.append(make_note(rng, en, zh, split, lang, i + 1))
        with open(os.path.join(OUT, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for note in notes:
                f.write(json.dumps(note, ensure_ascii=False) + "\n")
        types = {}
        for note in notes:
            for s in note["spans"]:
                types[s["type"]] = types.get(s["type"], 0) + 1
        totals[split] = (len(notes), sum(types.values()), types)
    for split, (n, spans, types) in totals.items():
        print(f"{split}: {n} notes, {spans} spans, {len(types)} types: {dict(sorted(types.items()))}")


if __name__ == "__main__":
    main()
