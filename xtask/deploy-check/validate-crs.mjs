// Validates Gateway API and ArgoCD objects against the JSON schemas that the
// @kubernetes-models packages ship (types, enums, required fields; unknown fields are not
// reported by these schemas). Input: a JSON file [{file, object}], written by crd-objects.py.
// Prints one line per failure and a summary; exits 1 when anything failed.

import { readFileSync } from "node:fs";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway";
import { GatewayClass } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GatewayClass";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { Application } from "@kubernetes-models/argo-cd/argoproj.io/v1alpha1/Application";
import { AppProject } from "@kubernetes-models/argo-cd/argoproj.io/v1alpha1/AppProject";
import { ApplicationSet } from "@kubernetes-models/argo-cd/argoproj.io/v1alpha1/ApplicationSet";

const MODELS = {
  "gateway.networking.k8s.io/v1 Gateway": Gateway,
  "gateway.networking.k8s.io/v1 GatewayClass": GatewayClass,
  "gateway.networking.k8s.io/v1 HTTPRoute": HTTPRoute,
  "argoproj.io/v1alpha1 Application": Application,
  "argoproj.io/v1alpha1 AppProject": AppProject,
  "argoproj.io/v1alpha1 ApplicationSet": ApplicationSet,
};

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
let checked = 0;
for (const { file, object } of items) {
  const name = `${object.kind}/${object.metadata?.name}`;
  const Model = MODELS[`${object.apiVersion} ${object.kind}`];
  if (!Model) {
    console.log(`${file}: ${name}: no schema for ${object.apiVersion} ${object.kind}`);
    failed += 1;
    continue;
  }
  checked += 1;
  try {
    new Model(object).validate();
  } catch (err) {
    console.log(`${file}: ${name}: ${err.message}`);
    failed += 1;
  }
}
console.log(`custom resources: ${checked} validated, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
