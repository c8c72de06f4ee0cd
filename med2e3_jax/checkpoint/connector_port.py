"""The MLP connectors: torch keys <-> `MLPConnector` parameters.

Keys are relative to the connector (`vision2d_connector.` / `vision3d_connector.` in a Med-2E3
`state_dict`, nothing in the release's `vision2d_connector/pytorch_model.bin`). The authors' connector
is `nn.Sequential(Linear, GELU, Linear)` under `_connector`, hence items 0 and 2. The 3D connector's
`text_mlp` belongs to TG-IS and is not covered here.
"""

from med2e3_jax.checkpoint.port import LINEAR, PortTable, Rule

CONNECTOR_TABLE = PortTable(
    rules=(
        Rule("_connector.0.weight", "linear_in.kernel", LINEAR),
        Rule("_connector.0.bias", "linear_in.bias"),
        Rule("_connector.2.weight", "linear_out.kernel", LINEAR),
        Rule("_connector.2.bias", "linear_out.bias"),
    ),
)
