from growfam.family.ledger import Ledger
from growfam.report.tables import format_comparison
from growfam.text import hours, loss, sci, short, si, text_table


def test_numbers_are_formatted_one_way():
    assert [si(v) for v in (None, 512, 1234, 1.09e9, 2.5e12)] == ["-", "512", "1.23K", "1.09B", "2.5T"]
    assert sci(2.4e20) == "2.40e20" and short(3.9e11) == "3.9e+11" and short(None) == "-"
    assert loss(5.786586) == "5.7866" and loss(None) == "-"
    assert hours(11474.4) == "11,474" and hours(1.18e-05) == "1.18e-05"


def test_tables_align_names_left_and_numbers_right():
    assert text_table([["member", "loss"], ["a", "1.5"], ["bbbbbbb", "10.25"]]) == [
        "member    loss", "a          1.5", "bbbbbbb  10.25"]


def test_a_member_with_a_trillion_tokens_reads_in_t():
    member = {"name": "big", "params": 8e9, "tokens": 1.2e12, "flops": 5.8e22, "cum_flops": 5.8e22,
              "val_loss": 2.0, "done": True, "wall_s": 1.0}
    ledger = {"plan": {}, "data_fingerprint": "abc", "growth": {}, "fixed_data": False, "data": "ds",
              "modes": {"progressive": [member]}}
    table = format_comparison(Ledger.from_json(ledger, "family.json"))
    assert "1.2T" in table and "8B" in table and "2.0000" in table
