"""FLARE provisioning builder for zenfed's packed CKKS contexts.

One secret context is made per provisioning run. Its secret key goes into the
``startup/`` folder of every site (client) kit only; the server kit gets a
public-only copy, which can add ciphertexts but not decrypt them; admin kits get
nothing. List it in ``project.yml`` after the WorkspaceBuilder::

    builders:
      - path: zenfed.provisioning.he_builder.HEContextBuilder
        args: {poly_modulus_degree: 4096, coeff_mod_bit_sizes: [60, 40]}
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nvflare.lighter.spec import Builder, Project, ProvisionContext

from zenfed.privacy.he import (
    SERVER_CONTEXT_FILE,
    SITE_CONTEXT_FILE,
    HEContext,
    HEKeyError,
    HEParams,
    make_public_context,
    make_secret_context,
    save_context,
)


class HEContextBuilder(Builder):
    """Write a secret CKKS context into site kits and a public-only one into the server kit."""

    def __init__(
        self, poly_modulus_degree: int = 4096, coeff_mod_bit_sizes: Sequence[int] = (60, 40)
    ) -> None:
        """Check the parameters (at least 128-bit security) now, before any kit is written.

        Args:
            poly_modulus_degree: CKKS ring size N.
            coeff_mod_bit_sizes: Prime sizes; the last one is SEAL's special prime.

        """
        self.params = HEParams(
            poly_modulus_degree=int(poly_modulus_degree),
            coeff_mod_bit_sizes=tuple(int(b) for b in coeff_mod_bit_sizes),
        )
        self._secret: HEContext | None = None

    def initialize(self, project: Project, ctx: ProvisionContext) -> None:
        """Make the project's secret key."""
        self._secret = make_secret_context(params=self.params)

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        """Write the context files into the server and site kits."""
        if self._secret is None:
            raise HEKeyError("HEContextBuilder.build ran before initialize")
        server = project.get_server()
        if server is not None:
            public = make_public_context(self._secret)
            if public.has_secret_key:
                raise HEKeyError("refusing to write a secret key into the server kit")
            path = save_context(public, os.path.join(ctx.get_kit_dir(server), SERVER_CONTEXT_FILE))
            ctx.info(f"wrote public-only HE context {path}")
        for client in project.get_clients():
            path = save_context(
                self._secret, os.path.join(ctx.get_kit_dir(client), SITE_CONTEXT_FILE)
            )
            ctx.info(f"wrote secret HE context {path}")

    def finalize(self, project: Project, ctx: ProvisionContext) -> None:
        """Drop the secret key from memory."""
        self._secret = None
