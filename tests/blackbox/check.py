"""Black-box check of a running `medgemma up`, from a non-Rust client (Python grpcio).

Nothing here is generated from our protos: every message type comes from the servers' own
reflection (v1alpha, what grpcio-reflection speaks), as a stranger's client would do it.

usage: check.py UP_STDOUT_LOG
  The log holds `<service> listening on HOST:PORT` lines; each server must be SERVING and list
  its service by reflection, the gateway must answer the four tasks (unary and streaming) and
  refuse bad requests with INVALID_ARGUMENT and google.rpc.BadRequest details.
"""

import base64
import re
import struct
import sys
import time
import zlib

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

EXPECTED = {
    "tokenizer": "medgemma.tokenizer.v1.Tokenizer",
    "vision": "medgemma.vision.v1.VisionEncoder",
    "generator": "medgemma.generation.v1.Generator",
    "gateway": "medgemma.gateway.v1.ClinicalTasks",
}
GATEWAY = EXPECTED["gateway"]
TIMEOUT = 120
SMALL = {"maxNewTokens": 12}

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def addresses(log_path):
    found = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(\S+) listening on (\S+)", line.strip())
            if m:
                found.setdefault(m.group(1), []).append(m.group(2))
    return found


def png(width=64, height=48):
    """A small grayscale gradient PNG, made by hand."""

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    rows = b"".join(
        b"\x00" + bytes((x * 255 // (width - 1) + y) % 256 for x in range(width))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class Gateway:
    def __init__(self, channel):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = self.pool.FindServiceByName(GATEWAY)

    def _method(self, name, stream):
        m = self.service.FindMethodByName(name)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        path = f"/{GATEWAY}/{name}"
        make = self.channel.unary_stream if stream else self.channel.unary_unary
        fn = make(
            path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return req_cls, fn

    def call(self, name, body):
        req_cls, fn = self._method(name, False)
        resp = fn(json_format.ParseDict(body, req_cls()), timeout=TIMEOUT)
        return json_format.MessageToDict(
            resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )

    def stream(self, name, body):
        req_cls, fn = self._method(name, True)
        return [
            json_format.MessageToDict(
                m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for m in fn(json_format.ParseDict(body, req_cls()), timeout=TIMEOUT)
        ]

    def error(self, name, body):
        try:
            self.call(name, body)
        except grpc.RpcError as e:
            details = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
            return e.code(), details
        return None, b""


def common(resp, what):
    check(bool(resp.get("model_id")), f"{what}: model id")
    usage = resp.get("usage", {})
    check(int(usage.get("prompt_tokens", 0)) > 0, f"{what}: usage.prompt_tokens")
    check(resp.get("finish_reason", "").startswith("FINISH_REASON_"), f"{what}: finish reason")
    check(float(resp.get("timings", {}).get("total_ms", 0)) > 0, f"{what}: timings")
    check(bool(resp.get("disclaimer")), f"{what}: disclaimer")


def check_server(name, service, addr):
    ch = grpc.insecure_channel(addr)
    health = health_pb2_grpc.HealthStub(ch)
    for svc in ("", service):
        status = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status
        check(status == health_pb2.HealthCheckResponse.SERVING, f"{name} {addr}: health {svc!r} SERVING")
    listed = ProtoReflectionDescriptorDatabase(ch).get_services()
    check(service in listed, f"{name} {addr}: reflection (v1alpha) lists {service}")
    check("grpc.health.v1.Health" in listed, f"{name} {addr}: reflection lists grpc.health.v1.Health")
    ch.close()


def main():
    addrs = addresses(sys.argv[1])
    for name, service in EXPECTED.items():
        check(name in addrs, f"`{name} listening on` printed")
        for addr in addrs.get(name, []):
            check_server(name, service, addr)

    ch = grpc.insecure_channel(
        addrs["gateway"][0], options=[("grpc.max_receive_message_length", 64 << 20)]
    )

    gw = Gateway(ch)

    t = time.time()
    r = gw.call("Ask", {"question": "What are the first-line treatments for Type 2 diabetes?", "sampling": SMALL})
    check(isinstance(r.get("answer"), str), "Ask: answer")
    common(r, "Ask")

    r = gw.call(
        "SummarizeClinicalNote",
        {"note": "65-year-old man, chest tightness and dyspnea for three days. BNP 450 pg/mL. "
                 "Diagnosis: acute decompensated heart failure (HFrEF). IV diuretics, low-salt diet. "
                 "Cardiology follow-up.", "sampling": {"maxNewTokens": 48}},
    )
    check(r.get("output_language") == "zh-TW", "Summarize: output_language defaults to zh-TW")
    for k in ("chief_complaint", "treatment_plan", "follow_up", "text"):
        check(isinstance(r.get(k), str), f"Summarize: typed field {k}")
    check(isinstance(r.get("diagnoses"), list), "Summarize: typed field diagnoses (a list)")
    common(r, "Summarize")

    options = ["Warfarin", "Aspirin", "Heparin", "Clopidogrel alone"]
    r = gw.call(
        "AnswerMultipleChoice",
        {"question": "Which antiplatelet drug is first-line in acute myocardial infarction?",
         "options": options, "sampling": SMALL},
    )
    probs = r.get("option_probabilities", [])
    check(len(probs) == len(options), "MCQ: one probability per option")
    check(abs(sum(probs) - 1.0) < 1e-6, "MCQ: probabilities sum to 1")
    idx = int(r.get("chosen_index", 0))
    check(r.get("chosen_letter") == "ABCD"[idx], "MCQ: chosen letter matches index")
    check(probs and probs[idx] == max(probs), "MCQ: chosen option is the most probable")
    common(r, "MCQ")

    r = gw.call(
        "DraftRadiologyReport",
        {"image": {"data": base64.b64encode(png()).decode(), "mime_type": "image/png"},
         "modality": "PA chest X-ray", "body_part": "chest", "sampling": {"maxNewTokens": 24}},
    )
    check(r.get("requires_physician_review") is True, "Report: requires_physician_review")
    for k in ("technique", "findings", "impression"):
        check(isinstance(r.get(k), str), f"Report: typed field {k}")
    common(r, "Report")

    msgs = gw.stream("AskStream", {"question": "What is hypertension?", "sampling": SMALL})
    check(len(msgs) >= 1 and "response" in msgs[-1], "AskStream: ends with the full response")
    check(all("text_delta" in m for m in msgs[:-1]), "AskStream: text deltas before it")
    print(f"     tasks took {time.time() - t:.1f} s", flush=True)

    bad = [
        ("Ask", {"question": ""}, "empty question"),
        ("SummarizeClinicalNote", {"note": "  "}, "empty note"),
        ("AnswerMultipleChoice", {"question": "q", "options": ["only one"]}, "one option"),
        ("AnswerMultipleChoice", {"question": "q", "options": [str(i) for i in range(11)]}, "eleven options"),
        ("DraftRadiologyReport", {"image": {"data": "aGVsbG8="}}, "not an image"),
        ("Ask", {"question": "q", "sampling": {"temperature": -1}}, "negative temperature"),
        ("Ask", {"question": "q", "sampling": {"temperature": "NaN"}}, "NaN temperature"),
        ("Ask", {"question": "q", "sampling": {"topP": 1.5}}, "top_p above 1"),
        ("Ask", {"question": "q", "sampling": {"topP": 0}}, "top_p 0"),
    ]
    for method, body, what in bad:
        code, details = gw.error(method, body)
        check(code == grpc.StatusCode.INVALID_ARGUMENT, f"bad request ({what}): INVALID_ARGUMENT (got {code})")
        check(b"google.rpc.BadRequest" in details, f"bad request ({what}): BadRequest details")

    if failures:
        print(f"{len(failures)} checks failed", flush=True)
        sys.exit(1)
    print("black-box checks passed", flush=True)


if __name__ == "__main__":
    main()
