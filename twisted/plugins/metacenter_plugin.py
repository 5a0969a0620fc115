from twisted.application.service import ServiceMaker

metacenter = ServiceMaker(
    "metacenter",
    "metacenter.runtime.tap",
    "Metadata center for AI inference clusters: engine load and KV-cache locations.",
    "metacenter",
)
