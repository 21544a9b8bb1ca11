"""The demo: the whole story wired together, the top layer.

It imports every other part (toolchain, device agent, gateway, bench), so it
lives above all of them; `toolchain demo` finds it through the
``edge_toolchain.commands`` entry-point group, not through an import.
"""
