"""Write the HTML report of a mini SmolLM2-shaped Llama and save a full-page screenshot of
it as ``docs/report.png`` (headless Chromium through selenium).

    python docs/make_report_screenshot.py [OUT.png]

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package
``selenium``. The analysis table is the roofline cost model at B=8, T=1024 on an H100 in bf16.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusegen
from fusegen.analysis import analyze
from fusegen.report import write_html_report

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH = 1400


def mini_smollm2() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,               # 49152
        hidden_size=96,               # 576
        intermediate_size=256,        # 1536
        num_hidden_layers=2,          # 30
        num_attention_heads=6,        # 9
        num_key_value_heads=2,        # 3
        max_position_embeddings=256,  # 8192
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def screenshot(html: Path, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--window-size={WIDTH},1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(html.as_uri())
        for _ in range(5):  # the window's frame takes some height; a taller page may grow
            inner, full = driver.execute_script(
                "return [window.innerHeight, document.documentElement.scrollHeight]")
            if inner >= full:
                break
            driver.set_window_size(WIDTH, driver.get_window_size()["height"] + full - inner)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("report.png")
    model = mini_smollm2()
    compiled = fusegen.compile(model)
    with tempfile.TemporaryDirectory() as tmp:
        rows = analyze(compiled, batch=8, seq=1024, gpu="h100", dtype=torch.bfloat16).summary_rows()
        html = write_html_report(compiled, Path(tmp) / "report.html", rows,
                                 title="fusegen report: mini SmolLM2-shaped Llama")
        screenshot(html, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
