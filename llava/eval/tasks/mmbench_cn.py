"""MMBench-CN (dev, Chinese): LLaVA's `--lang cn` prompt rules (the options as in English, then
"请直接回答选项字母。" asking for the letter only); scored and converted as MMBench."""

from llava.eval.tasks.mmbench import mmbench_task
from llava.eval.tasks.registry import register_task

SPLIT = "mmbench_dev_cn_20231003"

register_task(mmbench_task("mmbench_cn", "MMBench-CN", SPLIT, "cn"))
