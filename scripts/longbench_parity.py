"""LongBench metric parity check for `kvt eval-preds`.

Writes random predictions for ten LongBench tasks (every metric family) into
DIR/preds/<task>.jsonl and the task scores the Python libraries LongBench's
evaluation uses (rouge 1.0.1, fuzzywuzzy 0.18, jieba 0.42.1) give them into
DIR/expected.json, with fuzzywuzzy's difflib backend for code similarity, and
into DIR/expected_levenshtein.json with its python-Levenshtein backend (when
that package is installed). The metric functions below are written from
LONGBENCH_METRICS.md. Usage:

    python3 -m venv /tmp/lbv && /tmp/lbv/bin/pip install rouge==1.0.1 fuzzywuzzy==0.18.0 jieba==0.42.1 python-Levenshtein
    /tmp/lbv/bin/python scripts/longbench_parity.py SEED DIR
    kvt eval-preds --dir DIR/preds --json                          # must equal DIR/expected.json
    kvt eval-preds --dir DIR/preds --json --code-sim levenshtein   # must equal DIR/expected_levenshtein.json
"""
import json, random, re, string, sys, os
from collections import Counter
import jieba
from rouge import Rouge
from fuzzywuzzy import fuzz, utils
from difflib import SequenceMatcher
try:
    import Levenshtein
except ImportError:
    Levenshtein = None
jieba.setLogLevel(60)
random.seed(int(sys.argv[1]))
OUT = sys.argv[2]
os.makedirs(OUT + "/preds", exist_ok=True)
W = "the a an cat dog Paris paris U.S. city of light river bank 42 7 run ran jumps over lazy fox . , ! ? ' \" x-ray e-mail".split()
ZH = list("我们去北京上海天气很好今天明天的了是在有人这个中国大学") + ["，", "。", "！", " ", "2013-11-01", "6.5", "GPT-4o", "x_y", "\n", "iPhone", "3.14%"]
def words(n): return " ".join(random.choice(W) for _ in range(n))
def zh(n): return "".join(random.choice(ZH) for _ in range(n))
def norm(s):
    s = s.lower(); s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s); return " ".join(s.split())
def f1(p, g):
    c = Counter(p) & Counter(g); k = sum(c.values())
    if k == 0: return 0
    P, R = k / len(p), k / len(g); return 2 * P * R / (P + R)
def qa(p, g, **k): return f1(norm(p).split(), norm(g).split())
ZP = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.") | set(string.punctuation)
def nz(s): return "".join("".join(c for c in s.lower() if c not in ZP).split())
def qazh(p, g, **k):
    a = [nz(t) for t in jieba.cut(p, cut_all=False)]; b = [nz(t) for t in jieba.cut(g, cut_all=False)]
    return f1([t for t in a if t], [t for t in b if t])
def rg(p, g, **k):
    try: return Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]
    except Exception: return 0.0
def rgzh(p, g, **k): return rg(" ".join(jieba.cut(p, cut_all=False)), " ".join(jieba.cut(g, cut_all=False)))
def cls(p, g, all_classes, **k):
    m = [c for c in all_classes if c in p]
    for t in m:
        if t in g and t != g: m.remove(t)
    return 1.0 / len(m) if g in m else 0.0
def ret(p, g, **k):
    gid = re.findall(r"Paragraph (\d+)", g)[0]; ns = re.findall(r"\d+", p)
    return 0.0 if not ns else sum(1 for n in ns if str(n) == str(gid)) / len(ns)
def cnt(p, g, **k):
    ns = re.findall(r"\d+", p); return 0.0 if not ns else sum(1 for n in ns if str(n) == str(g)) / len(ns)
def fuzz_ratio(a, b, backend):
    # fuzz.ratio with a chosen backend: its equal / empty checks, then intr(100 * ratio).
    if a == b: return 100
    if not a or not b: return 0
    r = SequenceMatcher(None, a, b).ratio() if backend == "difflib" else Levenshtein.ratio(a, b)
    return utils.intr(100 * r)
def code(p, g, backend="difflib", **k):
    line = ""
    for l in p.lstrip("\n").split("\n"):
        if "`" not in l and "#" not in l and "//" not in l: line = l; break
    return fuzz_ratio(line, g, backend) / 100
tasks = {"hotpotqa": qa, "triviaqa": qa, "multifieldqa_zh": qazh, "gov_report": rg, "samsum": rg, "vcsum": rgzh,
         "trec": cls, "passage_retrieval_en": ret, "passage_count": cnt, "lcc": code}
classes = ["Location", "Loc", "Entity", "Human being", "Human", "Abbreviation", "Number"]
out = {}; out_lev = {}
for task, fn in tasks.items():
    total = 0; total_lev = 0; n = 120
    with open(f"{OUT}/preds/{task}.jsonl", "w") as f:
        for i in range(n):
            if task in ("multifieldqa_zh", "vcsum"):
                golds = [zh(random.randint(1, 30))]; pred = zh(random.randint(0, 40))
            elif task == "trec":
                golds = [random.choice(classes)]; pred = " ".join(random.sample(classes, random.randint(0, 3)))
            elif task == "passage_retrieval_en":
                golds = [f"Paragraph {random.randint(1, 30)}"]; pred = f"Paragraph {random.randint(1, 30)} and {random.randint(1,30)}" if random.random() < .5 else f"Paragraph {random.randint(1, 3)}"
            elif task == "passage_count":
                golds = [str(random.randint(1, 9))]; pred = " ".join(str(random.randint(1, 9)) for _ in range(random.randint(0, 3)))
            elif task == "lcc":
                golds = ["".join(random.choice("abcde(){} =+;._") for _ in range(random.randint(1, 300)))]
                pred = "\n".join(random.choice(["# c", "// c", "`x`", "".join(random.choice("abcde(){} =+;._") for _ in range(random.randint(0, 300)))]) for _ in range(3))
            else:
                golds = [words(random.randint(1, 12)) for _ in range(random.randint(1, 3))]
                pred = words(random.randint(0, 15)) + ("\n" + words(3) if random.random() < .3 else "")
            p2 = pred.lstrip("\n").split("\n")[0] if task in ("trec", "triviaqa", "samsum", "lsht") else pred
            s = 0
            for g in golds: s = max(s, fn(p2, g, all_classes=classes))
            total += s
            if Levenshtein is not None:
                s = 0
                for g in golds: s = max(s, fn(p2, g, all_classes=classes, backend="levenshtein"))
                total_lev += s
            f.write(json.dumps({"pred": pred, "answers": golds, "all_classes": classes, "length": random.randint(100, 12000)}, ensure_ascii=False) + "\n")
    out[task] = round(100 * total / n, 2)
    out_lev[task] = round(100 * total_lev / n, 2)
json.dump(out, open(OUT + "/expected.json", "w"), indent=1)
if Levenshtein is not None:
    json.dump(out_lev, open(OUT + "/expected_levenshtein.json", "w"), indent=1)
