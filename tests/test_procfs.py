"""kB fields of /proc files: read from a real file of that format, missing keys and files say None."""

from datamodels_ml.procfs import kb_field


def test_a_kb_field_is_read_in_bytes_and_only_on_its_own_key(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24000000 kB\nMemAvailable:   1234 kB\nMemAvailableX:  9 kB\n")
    assert kb_field(str(f), "MemAvailable") == 1234 * 1024
    assert kb_field(str(f), "MemTotal") == 24000000 * 1024


def test_a_missing_key_a_missing_file_and_a_garbled_line_give_none(tmp_path):
    f = tmp_path / "status"
    f.write_text("Name:\tpython\nRssFile:\n")
    assert kb_field(str(f), "VmRSS") is None
    assert kb_field(str(f), "RssFile") is None
    assert kb_field(str(tmp_path / "absent"), "RssFile") is None
