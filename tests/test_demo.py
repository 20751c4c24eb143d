"""The embedded demo: its dataset writer and a tiny end-to-end run (the full demo is too slow here)."""
import os
import re

from PIL import Image

from noah_mlp import demo
from noah_mlp.checkpoint import safe_load


def test_write_digits_dataset(tmp_path):
    counts = demo.write_digits_dataset(str(tmp_path), img_size=32, limit=200)
    assert counts['train'] + counts['val'] == 200
    assert 30 <= counts['val'] <= 50  # 20 % held out, per digit
    for split in ('train', 'val'):
        assert sorted(os.listdir(tmp_path / split)) == [str(d) for d in range(10)]
    img = Image.open(next((tmp_path / 'val' / '3').iterdir()))
    assert img.size == (32, 32) and img.mode == 'RGB'
    train_files = {f for d in range(10) for f in os.listdir(tmp_path / 'train' / str(d))}
    val_files = {f for d in range(10) for f in os.listdir(tmp_path / 'val' / str(d))}
    assert not train_files & val_files  # held-out images are never trained on


def test_tiny_demo_run(tmp_path, capfd):
    code = demo.main(['--output', str(tmp_path), '--epochs', '1', '--nproc', '1', '--limit', '300'])
    out = capfd.readouterr().out
    assert code == 0
    m = re.search(r'held-out top-1 (\d+\.\d+)%', out)
    assert m, out[-2000:]
    assert 0. <= float(m.group(1)) <= 100.
    r = demo.run_demo(str(tmp_path), epochs=1, nproc=1, limit=300, quiet=True)  # already trained: resumes, no work
    assert os.path.isfile(r['checkpoint']) and os.path.isdir(r['val_root'])
    assert r['experiment_dir'] == os.path.dirname(r['checkpoint'])
    assert abs(r['top1'] - float(m.group(1))) < 0.006  # printed with 2 decimals
    # the demo ends with attention pictures of held-out digits, and says where
    figures = r['attention_figures']
    assert len(figures) == 4 and all(os.path.dirname(f) == os.path.join(r['experiment_dir'], 'attention')
                                     for f in figures)
    assert Image.open(figures[0]).format == 'PNG'
    ckpt = safe_load(r['checkpoint'])
    assert ckpt['class_names'] == [str(d) for d in range(10)]  # the figures' row labels come from here
    assert 'attends to, for 4 held-out digits: ' + os.path.dirname(figures[0]) in out
