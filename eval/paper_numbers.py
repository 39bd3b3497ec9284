"""
The papers' result tables as data, transcribed from ../shared/reference/paper-digest.md §5
(NL = Nested Learning, arXiv 2512.24695 v1; Titans = arXiv 2501.00663). eval/reproduce.py
prints our numbers next to these.

    from eval.paper_numbers import PAPER
    PAPER["nl_table2"].value("1.3B / 100B", "Hope", "wiki_ppl")   # 14.39

Every table keeps the paper's row names (an asterisk marks a hybrid model, as in the
papers) and groups (model size / training tokens). Accuracies are in percent, as printed.
BABILong (NL Fig. 9, Titans Fig. 6) and continual learning (NL Figs. 6-8) are figures
without numbers in the text: FIGURE_ONLY says so, and no number is made up for them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperTable:
    """One table: groups (e.g. '760M / 30B') of rows (model name -> one value per column)."""
    name: str
    source: str
    columns: tuple
    groups: dict
    note: str = ""

    def __post_init__(self):
        for group, rows in self.groups.items():
            for model, values in rows.items():
                if len(values) != len(self.columns):       # a transcription slip fails at import
                    raise ValueError(f"{self.name}: row {group!r}/{model!r} has {len(values)} values "
                                     f"for {len(self.columns)} columns")

    def row(self, group: str, model: str) -> dict:
        """{column: value} of one row; KeyError names what exists."""
        if group not in self.groups:
            raise KeyError(f"{self.name} has no group {group!r}; groups: {', '.join(self.groups)}")
        rows = self.groups[group]
        if model not in rows:
            raise KeyError(f"{self.name} group {group!r} has no row {model!r}; rows: {', '.join(rows)}")
        return dict(zip(self.columns, rows[model]))

    def value(self, group: str, model: str, column: str):
        if column not in self.columns:
            raise KeyError(f"{self.name} has no column {column!r}; columns: {', '.join(self.columns)}")
        return self.row(group, model)[column]


# The eight accuracy columns whose mean is "Avg" in NL Table 2 / Titans Table 1 (LAMBADA acc
# included; checked against the 1.3B Hope row, paper-digest §5.1). HellaSwag and ARC-c are acc_norm.
ACCURACY_COLUMNS = ("lmb_acc", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "siqa", "boolq")
LM_COLUMNS = ("wiki_ppl", "lmb_ppl") + ACCURACY_COLUMNS + ("avg",)

NL_TABLE2 = PaperTable(
    name="nl_table2",
    source="NL-arXiv Table 2 (language modelling and common-sense reasoning; paper-digest §5.2)",
    columns=LM_COLUMNS,
    groups={
        "760M / 30B": {
            "Transformer++": (24.18, 24.27, 37.1, 67.2, 43.8, 53.0, 65.6, 33.4, 39.1, 61.7, 50.11),
            "Samba*": (21.07, 22.85, 39.2, 68.9, 47.8, 53.1, 65.8, 34.9, 38.9, 63.1, 51.46),
            "RetNet": (25.77, 24.19, 34.5, 66.8, 41.2, 51.9, 63.6, 32.5, 38.8, 56.2, 48.19),
            "DeltaNet": (24.52, 24.38, 36.8, 67.3, 44.5, 51.8, 64.2, 32.7, 39.6, 60.1, 49.63),
            "RWKV-7": (23.75, 23.08, 37.1, 67.3, 47.6, 52.2, 64.7, 34.2, 39.4, 61.9, 50.55),
            "Comba": (22.41, 22.19, 37.5, 66.9, 48.2, 52.4, 65.1, 34.1, 40.1, 62.8, 50.89),
            "TTT": (24.17, 23.51, 34.7, 67.3, 43.9, 51.0, 64.5, 33.8, 40.2, 59.6, 47.32),
            "Miras (Memora)": (22.28, 22.31, 38.2, 67.8, 49.3, 53.3, 63.6, 36.1, 40.9, 63.0, 51.53),
            "DLA": (23.12, 22.09, 36.1, 68.0, 47.9, 52.7, 65.8, 34.6, 39.1, 59.6, 50.48),
            "Titans": (20.08, 21.52, 38.1, 69.1, 48.5, 52.7, 66.2, 35.7, 40.3, 62.8, 51.68),
            "Hope": (18.68, 20.07, 38.8, 69.2, 49.1, 53.6, 66.8, 36.1, 41.2, 63.4, 52.28),
        },
        "1.3B / 100B": {
            "Transformer++": (17.92, 17.73, 42.6, 71.4, 52.3, 54.1, 69.9, 36.5, 41.8, 58.4, 53.38),
            "Samba*": (16.15, 13.21, 45.2, 71.5, 53.8, 55.8, 69.1, 36.7, 40.6, 63.0, 54.46),
            "RetNet": (18.91, 17.04, 41.2, 71.3, 49.1, 55.2, 67.5, 34.1, 41.4, 61.0, 52.60),
            "DeltaNet": (18.62, 17.10, 41.6, 70.1, 49.4, 52.7, 67.6, 35.2, 39.7, 54.8, 51.39),
            "RWKV-7": (18.44, 15.96, 46.7, 72.4, 54.9, 57.5, 71.6, 38.2, 40.7, 60.4, 55.30),
            "Comba": (18.16, 14.87, 46.9, 73.1, 54.5, 57.7, 72.0, 39.1, 40.2, 60.6, 55.39),
            "TTT": (18.42, 14.51, 46.8, 72.9, 55.2, 59.0, 71.8, 39.5, 39.8, 59.6, 55.58),
            "Miras (Memora)": (15.90, 12.04, 48.7, 73.1, 56.0, 57.4, 71.5, 37.9, 40.2, 61.3, 55.76),
            "DLA": (16.31, 12.29, 44.5, 70.6, 53.9, 54.2, 69.6, 36.0, 40.8, 60.2, 53.72),
            "Titans": (15.60, 11.41, 49.1, 73.1, 56.3, 59.8, 72.4, 40.8, 42.1, 61.0, 56.82),
            "Hope": (14.39, 10.08, 51.0, 73.9, 57.5, 61.2, 73.8, 42.7, 42.8, 61.4, 58.04),
        },
    },
    note=("Avg = mean of the 8 accuracy columns (except TTT 760M and Comba 1.3B, whose printed Avg "
          "differs from that mean in the paper itself). NL-NeurIPS Table 1 has older, different numbers."),
)

NL_TABLE6 = PaperTable(
    name="nl_table6",
    source="NL-arXiv Table 6 (Hope ablations; paper-digest §5.7)",
    columns=("ppl", "acc"),
    groups={
        "1.3B / 100B (inferred)": {
            "Hope": (12.24, 58.1),
            "w/o DGD (plain GD)": (13.41, 56.5),
            "w/o Momentum": (13.58, 56.9),
            "w/o weight decay (α)": (13.71, 57.2),
            "w/o CMS": (13.04, 57.3),
            "w/o inner-projection k": (13.77, 56.9),
            "w/o inner-projection v": (13.90, 55.1),
            "w/o inner-projection q": (12.19, 57.4),
        },
    },
    note=("The scale is not stated: ppl 12.24 = mean(14.39, 10.08) and acc 58.1 = Avg of the 1.3B Hope "
          "row of Table 2, so ppl = mean(Wiki ppl, LMB ppl) and acc = Avg at 1.3B / 100B (an inference)."),
)

TITANS_TABLE1 = PaperTable(
    name="titans_table1",
    source="Titans Table 1 (Wiki ppl / LMB ppl / Avg columns; paper-digest §5.2)",
    columns=("wiki_ppl", "lmb_ppl", "avg"),
    groups={
        "340M / 15B": {
            "Transformer++": (31.52, 41.08, 42.92),
            "Gated DeltaNet": (27.01, 30.94, 45.42),
            "LMM": (26.18, 29.97, 46.17),
            "MAC*": (25.43, 28.13, 47.36),
            "MAG*": (25.07, 28.72, 47.54),
            "MAL*": (24.69, 28.80, 46.55),
        },
        "400M / 15B": {
            "Transformer++": (30.63, 37.37, 45.64),
            "Mamba2": (26.34, 33.19, 46.91),
            "GDN": (25.47, 29.24, 47.26),
            "Samba*": (25.32, 29.47, 47.23),
            "GDN-H2*": (24.19, 28.09, 47.69),
            "LMM": (25.03, 28.99, 47.83),
            "MAC": (25.61, 27.73, 48.65),
            "MAG": (23.59, 27.81, 48.60),
            "MAL": (23.93, 27.89, 47.87),
        },
        "760M / 30B": {
            "Transformer++": (25.21, 27.64, 48.69),
            "Mamba": (28.12, 23.96, 47.22),
            "Mamba2": (22.94, 28.37, 48.34),
            "GDN": (21.18, 22.09, 49.69),
            "Samba*": (20.63, 22.71, 51.08),
            "GDN-H2*": (19.88, 20.83, 51.49),
            "LMM": (20.04, 21.96, 51.56),
            "MAC": (19.93, 20.12, 52.51),
            "MAG": (18.61, 19.86, 52.50),
            "MAL": (19.07, 20.33, 50.97),
        },
    },
    note="The digest gives only the summary columns; Avg is the mean of the same 8 accuracies as NL Table 2.",
)

NIAH_COLUMNS = tuple(f"s_niah_{task}_{length}" for task in (1, 2, 3) for length in ("4k", "8k", "16k"))

NL_TABLE1_SNIAH = PaperTable(
    name="nl_table1_sniah",
    source="NL-arXiv Table 1, single-needle part (RULER S-NIAH-1/2/3; paper-digest §5.3)",
    columns=NIAH_COLUMNS,
    groups={
        "50B tokens": {
            "Transformer": (88.6, 76.4, 79.8, 100, 98.8, 94.2, 78.0, 69.2, 40.8),
            "Hope-Attention": (100, 100, 100, 100, 98.4, 94.4, 76.8, 68.8, 42.4),
            "RWKV-7": (100, 100, 99.6, 93.8, 44.8, 12.6, 63.8, 13.2, 5.8),
            "Comba": (100, 100, 99.4, 92.6, 47.2, 13.4, 62.4, 13.8, 7.4),
            "DLA": (96.4, 71.2, 44.0, 79.6, 42.6, 28.2, 18.2, 8.8, 4.0),
            "Titans": (100, 100, 100, 99.6, 84.6, 75.4, 74.2, 42.8, 21.2),
            "Hope": (100, 100, 100, 99.2, 88.4, 78.2, 73.2, 46.2, 24.8),
        },
    },
    note="S-NIAH-1 pass-key, -2 number, -3 UUID. Model size not stated; trained from scratch on 50B tokens.",
)

TITANS_NIAH_COLUMNS = tuple(f"{task}_{length}" for task in ("pk", "n", "w") for length in ("2k", "4k", "8k", "16k"))

TITANS_TABLE2 = PaperTable(
    name="titans_table2",
    source="Titans Table 2 (S-NIAH pass-key / number / word; paper-digest §5.3)",
    columns=TITANS_NIAH_COLUMNS,
    groups={
        "Titans S-NIAH": {
            "TTT": (98.4, 98.8, 98.0, 88.4, 60.2, 36.6, 10.2, 4.4, 78.8, 28.0, 4.4, 0.0),
            "Mamba2": (98.6, 61.4, 31.0, 5.4, 98.4, 55.8, 14.2, 0.0, 42.2, 4.2, 0.0, 0.0),
            "DeltaNet": (96.8, 98.8, 98.6, 71.4, 47.2, 15.4, 12.8, 5.4, 46.2, 20.0, 1.6, 0.0),
            "LMM": (99.8, 98.4, 98.2, 96.2, 100, 99.8, 93.4, 80.2, 90.4, 89.4, 85.8, 80.6),
            "MAC": (99.2, 98.8, 99.0, 98.4, 99.6, 98.2, 97.6, 97.4, 98.2, 98.2, 95.6, 95.2),
            "MAG": (99.4, 98.0, 97.4, 97.4, 99.2, 98.8, 97.2, 98.6, 98.0, 98.0, 90.2, 88.2),
            "MAL": (98.8, 98.6, 98.8, 97.8, 99.8, 98.1, 96.8, 96.4, 98.0, 97.4, 92.0, 90.4),
        },
    },
    note="Model size not stated in the digest.",
)

PAPER = {t.name: t for t in (NL_TABLE2, NL_TABLE6, TITANS_TABLE1, NL_TABLE1_SNIAH, TITANS_TABLE2)}

# Results shown only as figures: the text gives no numbers (paper-digest §5.4-5.5 warns that
# numbers quoted elsewhere for them are not in the papers).
FIGURE_ONLY = {
    "babilong": "figure only (NL Fig. 9, Titans Fig. 6: no numbers in the text)",
    "continual": "figure only (NL Figs. 6-8: no numbers in the text)",
}


def average_accuracy(row: dict):
    """The papers' Avg: mean of the 8 accuracy columns, or None when one is missing."""
    values = [row.get(c) for c in ACCURACY_COLUMNS]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)
